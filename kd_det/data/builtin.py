"""Register the datasets a config names, so ``tools/train_net.py`` needs no extra code.

detectron2 registers COCO/LVIS/... under ``$DETECTRON2_DATASETS`` itself. kd_det adds:

* **Your own COCO-format data** from ``cfg.DATASETS.COCO``: a list of ``[name, json_file,
  image_root]`` registered with detectron2's ``register_coco_instances`` (as d2go's
  ``D2GO_DATA.DATASETS.COCO_INJECTION`` does, with the json's image list checked first:
  :mod:`kd_det.data.coco_json`), e.g. on the command line
  ``DATASETS.COCO '[["mydata_train", "data/train.json", "data/images"]]'``. Paths are relative
  to the working directory. Category ids may have gaps and ``file_name`` may contain
  subfolders, as pycocotools writes them: detectron2 maps ids to contiguous labels and joins
  ``file_name`` to the image root.
* **The generated scenes**: any dataset named ``synthetic*_train`` / ``synthetic*_val`` is
  registered from ``cfg.DATASETS.SYNTHETIC_ROOT`` (one root per config; use different prefixes
  for different roots).

Mistakes that would otherwise surface deep in a data-loader worker, or never (a model with the
wrong number of classes trains happily), fail here with the key and the fix named.
"""

import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog import file_key, read_coco_categories
from .coco_json import register_checked_coco

logger = logging.getLogger(__name__)

#: Written into the metadata of datasets registered from ``DATASETS.COCO``, so a later call with
#: other paths may replace them (and only them).
SOURCE = "DATASETS.COCO"
_EXAMPLE = 'DATASETS.COCO \'[["mydata_train", "path/train.json", "path/images"]]\''
_CATEGORY_CACHE = {}


def check_dataset_name(name, key):
    """Refuse a dataset name that is not one plain path component.

    Evaluation writes to ``OUTPUT_DIR/inference/<name>`` (and detectron2 caches
    ``<name>_coco_format.json`` there): a name such as ``../../escaped`` would write outside
    ``OUTPUT_DIR``.

    Raises:
        ValueError: the name is empty, ``.`` or ``..``, or holds a path separator or NUL.
    """
    seps = {"/", "\\", "\0", os.sep} | ({os.altsep} if os.altsep else set())
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in seps):
        raise ValueError(
            f"{key}: the dataset name {name!r} cannot be used: evaluation writes to "
            "OUTPUT_DIR/inference/<name>, so a name must be one plain path component (no '/', "
            "'\\' or '..'). Rename the dataset, e.g. 'mydata_val'."
        )


def coco_entries(cfg):
    """``cfg.DATASETS.COCO`` as validated ``(name, json_file, image_root)`` tuples (paths as given).

    Raises:
        ValueError: an entry is not a list of three strings; a name that is not a plain path
            component, is given twice, or is a name kd_det gives the generated data.
    """
    out, seen = [], {}
    for i, entry in enumerate(cfg.DATASETS.COCO):
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(x, str) and x for x in entry)
        ):
            raise ValueError(
                f"DATASETS.COCO entry {i} is {entry!r}; each entry must be [name, json_file, "
                f"image_root] (three non-empty strings). On the command line: {_EXAMPLE}"
            )
        name = entry[0]
        check_dataset_name(name, f"DATASETS.COCO entry {i}")
        if name in seen:
            raise ValueError(
                f"DATASETS.COCO entries {seen[name]} and {i} are both named '{name}' (the second "
                "would silently replace the first). Give each entry its own name."
            )
        if _is_synthetic(name):
            raise ValueError(
                f"DATASETS.COCO entry {i} is named '{name}', a name kd_det gives the generated "
                "data (synthetic*_train/_val/_test, from DATASETS.SYNTHETIC_ROOT): one of the two "
                "would silently replace the other. Give your data another name, e.g. "
                f"'my{name}', and use that name in DATASETS.TRAIN / DATASETS.TEST."
            )
        seen[name] = i
        out.append(tuple(entry))
    return out


def coco_category_names(json_file):
    """Category names of a COCO json in id order (detectron2's ``thing_classes`` order).

    Decodes only the json's ``"categories"`` array (:func:`~kd_det.data.catalog.
    read_coco_categories`), once per (path, mtime): the one full parse of the file is left to
    detectron2's loader.
    """
    key = file_key(json_file)
    if key not in _CATEGORY_CACHE:
        cats = read_coco_categories(json_file)
        _CATEGORY_CACHE[key] = [c.get("name") for c in sorted(cats, key=lambda c: c["id"])]
    return list(_CATEGORY_CACHE[key])


def register_coco_from_config(cfg):
    """Register every ``DATASETS.COCO`` entry; check the ones the config trains or tests on.

    Returns:
        list[str]: the registered names.

    Raises:
        FileNotFoundError: a json file or image root does not exist.
        ValueError: a malformed entry, a name detectron2 already uses for other data, or a json
            whose category count differs from ``MODEL.ROI_HEADS.NUM_CLASSES``.
    """
    used = set(cfg.DATASETS.TRAIN) | set(cfg.DATASETS.TEST)
    names = []
    for name, json_file, image_root in coco_entries(cfg):
        for what, path, pos, isdir in (
            ("json file", json_file, "second", False),
            ("image root", image_root, "third", True),
        ):
            if not (os.path.isdir(path) if isdir else os.path.isfile(path)):
                raise FileNotFoundError(
                    f"DATASETS.COCO: the {what} '{path}' of dataset '{name}' does not exist "
                    f"(working directory {os.getcwd()}). Fix the {pos} element of its "
                    "[name, json_file, image_root] entry; relative paths are relative to the "
                    "working directory."
                )
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        names.append(name)
        if name in used:
            _check_num_classes(cfg, name, json_file)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
                continue
            if meta.get("kd_det_source") != SOURCE:
                raise ValueError(
                    f"DATASETS.COCO: the name '{name}' is already registered (by detectron2's "
                    "built-in datasets or by your code) for other data. Give the entry another "
                    "name, and use that name in DATASETS.TRAIN / DATASETS.TEST."
                )
            logger.warning(f"Re-registering dataset {name} from {json_file}")
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_checked_coco(name, {"kd_det_source": SOURCE}, json_file, image_root)
        # Known before the json is loaded (teacher checks, visualization); detectron2's loader
        # later sets the same list, in the same (id-sorted) order.
        MetadataCatalog.get(name).set(thing_classes=coco_category_names(json_file))
    return names


def _check_num_classes(cfg, name, json_file):
    if cfg.MODEL.META_ARCHITECTURE == "OnlineDistillationRCNN":
        return  # each peer's own config sets its class count
    classes = coco_category_names(json_file)
    expected = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if len(classes) != expected:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise ValueError(
            f"DATASETS.COCO: dataset '{name}' ({json_file}) has {len(classes)} categories "
            f"[{shown}] but MODEL.ROI_HEADS.NUM_CLASSES is {expected}. Set "
            f"MODEL.ROI_HEADS.NUM_CLASSES {len(classes)} (for a distillation config, the "
            "teacher must have been trained with the same categories), or fix the json's "
            "'categories'."
        )


def register_datasets_from_config(cfg):
    """Register ``DATASETS.COCO`` and every generated dataset that ``DATASETS.TRAIN``/``TEST``
    names (see the module docstring). Safe to call again with the same config.

    Raises:
        FileNotFoundError: data is missing; the message names the key or gives the command that
            makes the data.
        ValueError: see :func:`register_coco_from_config`.
    """
    from .synthetic import register_synthetic_coco

    for key in ("DATASETS.TRAIN", "DATASETS.TEST"):
        for name in cfg.DATASETS[key.split(".")[1]]:
            check_dataset_name(name, key)
    register_coco_from_config(cfg)
    prefixes = set()
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name in DatasetCatalog.list():
            continue
        if _is_synthetic(name):
            prefixes.add(name.rsplit("_", 1)[0])
    for prefix in sorted(prefixes):
        register_synthetic_coco(prefix, cfg.DATASETS.SYNTHETIC_ROOT)


def _is_synthetic(name):
    return name.startswith("synthetic") and name.rsplit("_", 1)[-1] in ("train", "val", "test")


def dataset_class_names(cfg, name):
    """The class names of dataset ``name`` as ``cfg`` defines it, without loading its images.

    Looks at ``cfg.DATASETS.COCO`` first (a teacher's config may define its own data), then the
    registered metadata, then the generator's fixed classes for ``synthetic*`` names.

    Returns:
        list[str] or None: None when the classes cannot be known cheaply.
    """
    for entry_name, json_file, _ in coco_entries(cfg):
        if entry_name == name and os.path.isfile(json_file):
            return coco_category_names(json_file)
    if name in MetadataCatalog.list() and MetadataCatalog.get(name).get("thing_classes"):
        return list(MetadataCatalog.get(name).thing_classes)
    if _is_synthetic(name):
        from .synthetic import CLASS_NAMES

        return list(CLASS_NAMES)
    return None


def training_class_names(cfg):
    """``(dataset name, class names)`` of the first ``DATASETS.TRAIN`` entry whose classes are
    known (:func:`dataset_class_names`), else ``(None, None)``."""
    for name in cfg.DATASETS.TRAIN:
        classes = dataset_class_names(cfg, name)
        if classes is not None:
            return name, classes
    return None, None


def compare_teacher_classes(cfg, tcfg):
    """Compare the teacher's training classes with the student's, in label order.

    Returns:
        str or None: a description of the difference (both datasets, the first differing label),
        or None when they match or either side is unknown.
    """
    s_name, s_classes = training_class_names(cfg)
    t_name, t_classes = training_class_names(tcfg)
    if s_classes is None or t_classes is None or s_classes == t_classes:
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(t_classes, s_classes)) if a != b),
        min(len(t_classes), len(s_classes)),
    )
    t_at = t_classes[first] if first < len(t_classes) else "(none)"
    s_at = s_classes[first] if first < len(s_classes) else "(none)"
    return (
        f"the teacher was trained on '{t_name}' ({len(t_classes)} classes) and the student on "
        f"'{s_name}' ({len(s_classes)} classes); label {first} is '{t_at}' for the teacher and "
        f"'{s_at}' for the student"
    )
