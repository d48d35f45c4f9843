"""Procedurally generated COCO-format detection data ("synthetic shapes").

Why generate data at all: kd_det's experiments must run on a CPU in minutes, without downloading
COCO. A generated dataset is small, reproducible and free of licences, and its difficulty can be
tuned so that model capacity matters: a larger teacher should beat a small student by a clear AP
margin, otherwise there is nothing to distil.

The scenes themselves (shapes, clutter, annotation rules) are drawn by
:mod:`kd_det.data.synthetic_scene`; this module writes them as COCO splits and registers them.

Layout on disk (written by :func:`generate_dataset`)::

    DIR/train.json   DIR/train/000000.jpg ...
    DIR/val.json     DIR/val/000000.jpg ...
    DIR/meta.json    (generation parameters; written last, used to skip regeneration)

``file_name`` in the json files is relative to the image root ``DIR/<split>`` (e.g.
``"000000.jpg"``), which is what ``register_coco_instances(name, {}, json, image_root)`` expects.
"""

import json
import logging
import os
import re

from PIL import Image

from .synthetic_scene import (  # noqa: F401 (CLASS_NAMES, image_rng: part of this module's API)
    CLASS_NAMES,
    GENERATOR_VERSION,
    generate_scene,
    image_rng,
)

logger = logging.getLogger(__name__)

#: JPEG quality of the written images.
JPEG_QUALITY = 95

#: Defaults of ``tools/make_synthetic_coco.py``; also quoted in the "data missing" error message.
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 300
DEFAULT_IMAGE_SIZE = 192
DEFAULT_SEED = 0

_IMAGE_NAME_RE = re.compile(r"^\d{6}\.jpg$")


# -------------------------------------------------------------------------------------------------
# COCO writing.
# -------------------------------------------------------------------------------------------------
def _categories():
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)]


def _write_json_atomic(path, obj):
    # tmp + os.replace: a reader never sees a half-written file, and a crash leaves no valid json.
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def write_coco_split(output_dir, split, num_images, image_size, seed, show_progress=True):
    """Generate one split: images in ``output_dir/<split>/`` and ``output_dir/<split>.json``.

    Args:
        output_dir (str): dataset root.
        split (str): split name, e.g. ``"train"``; part of every image's seed.
        num_images (int): number of images.
        image_size (int): side of the square images.
        seed (int): dataset seed (non-negative).
        show_progress (bool): show a tqdm progress bar.

    Returns:
        str: path of ``output_dir/<split>.json``. Its ``file_name`` entries are relative to the
        image root ``output_dir/<split>``.
    """
    from tqdm import tqdm

    image_dir = os.path.join(output_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    names = set()
    for i in tqdm(range(num_images), desc=f"{split}", disable=not show_progress, unit="img"):
        image, anns = generate_scene(image_rng(seed, split, i), image_size)
        file_name = f"{i:06d}.jpg"
        names.add(file_name)
        Image.fromarray(image).save(os.path.join(image_dir, file_name), quality=JPEG_QUALITY)
        image_id = i + 1
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    # Images left over from an earlier, larger generation would be confusing on disk; remove them.
    for name in os.listdir(image_dir):
        if _IMAGE_NAME_RE.match(name) and name not in names:
            os.remove(os.path.join(image_dir, name))
    coco = {
        "info": {
            "description": "kd_det synthetic shapes",
            "version": str(GENERATOR_VERSION),
            "seed": int(seed),
            "split": split,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": _categories(),
    }
    json_path = os.path.join(output_dir, f"{split}.json")
    _write_json_atomic(json_path, coco)
    return json_path


def summarize_coco_json(json_path):
    """Count images, annotations and annotations per class of one split's json.

    Returns:
        dict: ``{"images": int, "annotations": int, "per_class": {name: count}}``.
    """
    with open(json_path) as f:
        coco = json.load(f)
    id_to_name = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = {name: 0 for name in id_to_name.values()}
    for ann in coco["annotations"]:
        per_class[id_to_name[ann["category_id"]]] += 1
    return {
        "images": len(coco["images"]),
        "annotations": len(coco["annotations"]),
        "per_class": per_class,
    }


def _meta_params(num_train, num_val, image_size, seed, num_test=0):
    params = {
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
    }
    if num_test:  # absent when 0, so datasets written before the test split still match
        params["num_test"] = int(num_test)
    return params


def _splits(params):
    """(split, number of images) of a dataset's parameters."""
    out = [("train", params["num_train"]), ("val", params["num_val"])]
    return out + ([("test", params["num_test"])] if params.get("num_test") else [])


def _is_complete(output_dir, params):
    """True if ``meta.json`` matches ``params`` and every json and image it implies is present."""
    try:
        with open(os.path.join(output_dir, "meta.json")) as f:
            if json.load(f) != params:
                return False
        for split, n in _splits(params):
            with open(os.path.join(output_dir, f"{split}.json")) as f:
                images = json.load(f)["images"]
            if len(images) != n:
                return False
            image_dir = os.path.join(output_dir, split)
            if not all(os.path.isfile(os.path.join(image_dir, im["file_name"])) for im in images):
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def generate_dataset(
    output_dir, num_train, num_val, image_size, seed, show_progress=True, num_test=0
):
    """Generate the train, val and (optional) test splits, or skip if an identical dataset is
    already on disk.

    Studies use ``val`` as the dev split (every choice is made on it) and ``test`` for the numbers
    they report; each split's images are drawn from their own seeds, so adding a test split leaves
    train and val unchanged.

    ``meta.json`` is removed before generating and written last, so an interrupted run is never
    mistaken for a complete one and is simply redone next time.

    Args:
        output_dir (str): dataset root (created if needed).
        num_train (int): number of training images.
        num_val (int): number of validation images.
        image_size (int): side of the square images.
        seed (int): dataset seed (non-negative).
        show_progress (bool): show progress bars and a message when skipping.
        num_test (int): number of test images (0: no test split).

    Returns:
        dict: ``root``, ``<split>_json``, ``skipped`` (bool) and per-split summaries ``train`` /
        ``val`` / ``test`` from :func:`summarize_coco_json`.
    """
    output_dir = os.path.abspath(output_dir)
    params = _meta_params(num_train, num_val, image_size, seed, num_test)
    meta_path = os.path.join(output_dir, "meta.json")
    skipped = _is_complete(output_dir, params)
    if skipped:
        msg = f"Synthetic COCO data in {output_dir} already matches {params}; skipping generation."
        logger.info(msg)
        if show_progress:
            print(msg)
    else:
        os.makedirs(output_dir, exist_ok=True)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        for split, n in _splits(params):
            write_coco_split(output_dir, split, n, image_size, seed, show_progress=show_progress)
        _write_json_atomic(meta_path, params)
    result = {"root": output_dir, "skipped": skipped}
    for split, _ in _splits(params):
        result[f"{split}_json"] = os.path.join(output_dir, f"{split}.json")
        result[split] = summarize_coco_json(result[f"{split}_json"])
    return result


# -------------------------------------------------------------------------------------------------
# detectron2 registration.
# -------------------------------------------------------------------------------------------------
def _generate_command(root):
    return (
        f"python tools/make_synthetic_coco.py --output {root} --num-train {DEFAULT_NUM_TRAIN} "
        f"--num-val {DEFAULT_NUM_VAL} --image-size {DEFAULT_IMAGE_SIZE} --seed {DEFAULT_SEED}"
    )


def register_synthetic_coco(name_prefix, root):
    """Register ``<prefix>_train``, ``<prefix>_val`` (and ``<prefix>_test`` when the data has a
    test split) with detectron2's catalogs.

    The data must already exist (registration is lazy in detectron2, so checking here turns a
    confusing failure deep inside the data loader into an actionable error at startup).
    Re-registering the same name with the same paths is a no-op; with different paths, the old
    entry is replaced.

    Args:
        name_prefix (str): dataset name prefix, e.g. ``"synthetic"``.
        root (str): dataset root written by :func:`generate_dataset`.

    Returns:
        tuple: ``(train_name, val_name)``.

    Raises:
        FileNotFoundError: if a split's json or image directory is missing; the message gives the
            command that generates it.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .coco_json import register_checked_coco

    root = os.path.abspath(root)
    names = []
    has_test = os.path.exists(os.path.join(root, "test.json"))
    for split in ("train", "val") + (("test",) if has_test else ()):
        json_file = os.path.join(root, f"{split}.json")
        image_root = os.path.join(root, split)
        for path in (json_file, image_root):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"Synthetic COCO data is missing: {path} does not exist. Generate it with:\n"
                    f"  {_generate_command(root)}"
                )
        name = f"{name_prefix}_{split}"
        names.append(name)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            same = (
                getattr(meta, "json_file", None) == json_file
                and getattr(meta, "image_root", None) == image_root
            )
            if same:
                continue
            logger.warning(f"Re-registering dataset {name} with data from {root}")
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_checked_coco(name, {}, json_file, image_root)
        # Set eagerly so models can read the number of classes before the json is loaded; the
        # lazy loader later sets the same list (ids are sorted, matching CLASS_NAMES order).
        MetadataCatalog.get(name).set(thing_classes=list(CLASS_NAMES))
    return tuple(names)
