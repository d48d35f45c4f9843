"""COCO json checked before detectron2 reads it: the image list, and the file's encoding.

detectron2's ``load_coco_json`` trusts the file: pycocotools indexes images by ``id``, so two
images with one id become one image carrying both images' boxes (detectron2 logs only "only 81
match"); an image without ``width``/``height`` stops with a bare ``KeyError``; a Latin-1 or UTF-16
file stops with a ``UnicodeDecodeError`` naming no file. kd_det registers COCO data
(``DATASETS.COCO`` and the generated scenes) with :func:`register_checked_coco`, whose loader
first checks the ``"images"`` array (:func:`check_coco_images`) -- decoding that array only, so
the check costs a read of the file (about a second for COCO's train json), not a second full parse
-- and then hands the file to detectron2's loader unchanged. Boxes are checked on the loaded dicts
(:mod:`kd_det.data.checks`).
"""

import logging
import numbers

from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog import decode_array_after, read_json_text

logger = logging.getLogger(__name__)

__all__ = ["CocoJsonError", "check_coco_images", "load_checked_coco_json", "register_checked_coco"]

_SHOWN = 5


class CocoJsonError(ValueError):
    """A COCO json that detectron2 would misread or fail on without naming the file."""


def _is_image_list(value):
    return all(isinstance(im, dict) for im in value) and any("file_name" in im for im in value)


def _positive_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and x > 0


def check_coco_images(json_file, dataset_name):
    """Check the ``"images"`` array of a COCO json: UTF-8, unique ids, sizes present.

    Args:
        json_file (str): the file.
        dataset_name (str): named in messages.

    Returns:
        int: the number of images.

    Raises:
        CocoJsonError: the file is not UTF-8; two images share an id; an image lacks ``id``,
            ``file_name``, ``width`` or ``height``, or its size is not a positive number. The
            message names the dataset, the file, the images and the fix.
    """
    where = f"Dataset '{dataset_name}' ({json_file})"
    try:
        text = read_json_text(json_file)
    except ValueError as e:
        raise CocoJsonError(f"Dataset '{dataset_name}': {e}") from None
    images = decode_array_after(text, "images", _is_image_list)
    del text
    if images is None:
        return 0  # no image list found: detectron2's own parse reports what it finds
    missing, bad_size, by_id = [], [], {}
    for i, im in enumerate(images):
        name = f"'{im.get('file_name', '?')}' (images[{i}])"
        absent = [k for k in ("id", "file_name", "width", "height") if k not in im]
        if absent:
            missing.append(f"{name} has no {', '.join(repr(k) for k in absent)}")
            continue
        if not (_positive_number(im["width"]) and _positive_number(im["height"])):
            bad_size.append(f"{name} has width {im['width']!r}, height {im['height']!r}")
        by_id.setdefault(im["id"], []).append(im["file_name"])
    if missing:
        raise CocoJsonError(
            f"{where}: {len(missing)} images lack keys detectron2 needs: "
            + "; ".join(missing[:_SHOWN])
            + ". Every image needs id, file_name, width and height (pixels; e.g. from "
            "PIL.Image.open(path).size). Add them to the json."
        )
    if bad_size:
        raise CocoJsonError(
            f"{where}: {len(bad_size)} images have a width or height that is not a positive "
            "number: " + "; ".join(bad_size[:_SHOWN]) + ". Write sizes as numbers of pixels."
        )
    shared = [(i, files) for i, files in by_id.items() if len(files) > 1]
    if shared:
        shown = "; ".join(
            f"id {i!r}: " + ", ".join(f"'{f}'" for f in files[:3]) for i, files in shared[:_SHOWN]
        )
        raise CocoJsonError(
            f"{where}: {len(shared)} image ids are used by more than one image ({shown}). "
            "detectron2 would keep one image per id and give it the boxes of all of them. Give "
            "every image its own id (and point each annotation's image_id at its image)."
        )
    return len(images)


def load_checked_coco_json(json_file, image_root, dataset_name):
    """:func:`check_coco_images`, then detectron2's ``load_coco_json`` on the same file."""
    from detectron2.data.datasets import coco  # looked up at call time, as detectron2 does

    check_coco_images(json_file, dataset_name)
    return coco.load_coco_json(json_file, image_root, dataset_name)


def register_checked_coco(name, metadata, json_file, image_root):
    """detectron2's ``register_coco_instances``, loading through :func:`load_checked_coco_json`.

    The metadata is the same (``json_file``, ``image_root``, ``evaluator_type`` "coco" and
    ``metadata``), so evaluation and visualisation see no difference.
    """
    DatasetCatalog.register(name, lambda: load_checked_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )
