"""Input checks before the first training step: images that exist and decode, boxes that make sense.

detectron2 finds a missing or truncated image only when a loader worker maps it, possibly hours
in, and drops or empties bad boxes silently. Here every training and test image is opened and
fully decoded at start (``KD_TRAINER.CHECK_IMAGES``: "decode", or "header" for COCO-sized sets;
16-bit and float images are refused either way), and box values are checked in every set and box
geometry in training sets, so a bad input stops the run in seconds with the file named (or, with
``KD_TRAINER.SKIP_UNREADABLE_IMAGES``, bad images are dropped and counted). Under DDP each process
checks its share. A training set without boxes is refused; a test set without boxes warns.
See docs/troubleshooting.md, "Missing or unreadable images, invalid boxes", for each message.
"""

import logging
import math
import numbers
import os
import time

from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode
from detectron2.utils import comm

logger = logging.getLogger(__name__)

#: Values of ``KD_TRAINER.CHECK_IMAGES``.
CHECK_MODES = ("decode", "header", "off")
#: PIL modes detectron2's ``read_image`` converts to 8-bit RGB/BGR without losing the image.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                             "CMYK", "YCbCr", "LAB", "HSV"})  # fmt: skip
_SHOWN = 5  # examples named in a message


def _image_problem(d, decode):
    """None if the image is fine, else a short reason."""
    from PIL import Image

    path = d["file_name"]
    if not os.path.isfile(path):
        return "does not exist"
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            if decode:
                im.load()  # the pixel data: a truncated or corrupt file fails only here
    except Exception as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    if mode not in EIGHT_BIT_MODES:
        return (
            f"has PIL mode {mode} (16-bit or float pixels), which detectron2's read_image would "
            "clip to white; convert it to 8-bit (e.g. PIL: Image.fromarray((np.asarray(im) >> 8)"
            ".astype('uint8')) for 16-bit)"
        )
    w, h = d.get("width"), d.get("height")
    if decode and w and h and size != (w, h):
        # detectron2 would stop later with "Mismatched image shape"; PIL's size is before EXIF
        # rotation, so accept the transposed size too.
        if size != (h, w):
            return f"is {size[0]}x{size[1]} but the annotation file says {w}x{h}"
    return None


def find_bad_images(dicts, mode="decode"):
    """``[(file_name, reason)]`` of the images that are missing or do not read.

    Under DDP each process checks every ``world_size``-th image and the lists are gathered, so the
    check costs each process only its share.
    """
    if mode == "off":
        return []
    if mode not in CHECK_MODES:
        raise ValueError(f"KD_TRAINER.CHECK_IMAGES must be one of {CHECK_MODES}, got {mode!r}")
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = []
    for d in dicts[rank::world]:
        reason = _image_problem(d, decode=mode == "decode")
        if reason is not None:
            mine.append((d["file_name"], reason))
    if world == 1:
        return mine
    return sorted(x for part in comm.all_gather(mine) for x in part)


_REAL_TYPES = (float, int)


def _value_problem(bbox):
    """Why ``bbox`` is not four finite numbers (None when it is)."""
    if (
        type(bbox) is list
        and len(bbox) == 4
        and all(type(v) in _REAL_TYPES for v in bbox)
        and all(math.isfinite(v) for v in bbox)
    ):
        return None  # the json case, fast
    try:
        bbox = list(bbox)  # a list from json; a tuple or an array from a registered function
    except TypeError:
        bbox = None
    if bbox is None or len(bbox) != 4:
        return "must hold 4 numbers [x, y, width, height]"
    if any(isinstance(v, str) for v in bbox):
        return "holds strings; write the coordinates as JSON numbers, e.g. [10.0, 20.0, 30.0, 40.0]"
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in bbox):
        return "holds values that are not numbers"
    if not all(math.isfinite(v) for v in bbox):
        return "is not finite (NaN or infinity)"
    return None


def box_problems(dicts, geometry=True):
    """Check every non-crowd box: four finite numbers and, with ``geometry``, against its image.

    Returns:
        tuple(list[str], int, int): descriptions of invalid boxes (not four finite numbers;
        with ``geometry``, a negative width or height, or wholly outside the image) naming the
        image file, its ``image_id`` and the annotation (its ``id`` when the loader kept it, else
        its index in the image); the number of boxes partly outside their image (detectron2's
        mapper clips them); the number of zero-size boxes (the mapper drops them).
    """
    invalid, clipped, empty = [], 0, 0

    def where(d, i, ann):
        return (
            f"image '{d['file_name']}' (image_id {d.get('image_id')}), annotation "
            + (f"id {ann['id']}" if "id" in ann else f"index {i}")
            + f": bbox {ann['bbox']}"
        )

    # COCO's train set has 860k boxes: the common path does plain arithmetic only (BoxMode.convert
    # builds a tensor per box, and a message is formatted only for a box that has a problem).
    for d in dicts:
        width, height = d.get("width"), d.get("height")
        for i, ann in enumerate(d.get("annotations", [])):
            bbox = ann.get("bbox")
            if bbox is None:
                continue
            problem = _value_problem(bbox)
            if problem:
                invalid.append(f"{where(d, i, ann)} {problem}")
                continue
            if not geometry or ann.get("iscrowd", 0):
                continue
            mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
            x0, y0, a, b = bbox
            if mode == BoxMode.XYWH_ABS:
                w, h, x1, y1 = a, b, x0 + a, y0 + b
            elif mode == BoxMode.XYXY_ABS:
                w, h, x1, y1 = a - x0, b - y0, a, b
            else:
                continue  # relative or rotated boxes: not kd_det's detectors
            if w < 0 or h < 0:
                invalid.append(f"{where(d, i, ann)} has a negative width or height")
            elif width and height and (x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height):
                invalid.append(f"{where(d, i, ann)} lies wholly outside the {width}x{height} image")
            elif w == 0 or h == 0:
                empty += 1
            elif width and height and (x0 < 0 or y0 < 0 or x1 > width or y1 > height):
                clipped += 1
    return invalid, clipped, empty


def check_instance_masks(dataset_names):
    """``MODEL.MASK_ON``: every training box must come with its ``segmentation``.

    detectron2's mapper adds ``gt_masks`` only when annotations carry polygons or RLE; without
    them the mask head fails at iteration 0 with an attribute error naming nothing.

    Raises:
        ValueError: naming the dataset, an image and an annotation without a mask, and the fix.
    """
    for name in dataset_names:
        for d in DatasetCatalog.get(name):
            for i, ann in enumerate(d.get("annotations", [])):
                if not ann.get("iscrowd", 0) and not ann.get("segmentation"):
                    which = f"id {ann['id']}" if "id" in ann else f"index {i}"
                    raise ValueError(
                        f"MODEL.MASK_ON is True, but dataset '{name}'{_source(name)} has boxes "
                        f"without masks, e.g. image '{d['file_name']}', annotation {which} has no "
                        "'segmentation': the mask head would have nothing to learn from. Set "
                        "MODEL.MASK_ON False to train a box-only detector, or use data with "
                        "instance masks (COCO 'segmentation' polygons or RLE)."
                    )


def _source(name):
    """`` (<json file>)`` when the dataset was registered from one, else ""."""
    from detectron2.data import MetadataCatalog

    json_file = MetadataCatalog.get(name).get("json_file") if name in MetadataCatalog else None
    return f" ({json_file})" if json_file else ""


def _drop_images(name, bad_files):
    """Re-register dataset ``name`` without ``bad_files`` (its metadata is unchanged)."""
    load = DatasetCatalog[name]
    bad_files = frozenset(bad_files)
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [d for d in load() if d["file_name"] not in bad_files])


def check_dataset_files(dataset_names, mode="decode", skip_unreadable=False, check_boxes=True):
    """Stop, with the file named, when an image is missing, does not decode or has invalid boxes.

    Args:
        dataset_names (Iterable[str]): registered dataset names.
        mode (str): "decode" (full decode), "header" (PIL's lazy open only) or "off".
        skip_unreadable (bool): drop missing and unreadable images from the dataset (it is
            re-registered without them) and log how many, instead of stopping.
        check_boxes (bool): check the boxes' geometry and require at least one box (training
            sets; test boxes are only scored: their values are checked, their geometry is not).

    Raises:
        FileNotFoundError: images do not exist (and ``skip_unreadable`` is off).
        ValueError: an empty dataset, unreadable images, or invalid boxes.
    """
    for name in dataset_names:
        dicts = DatasetCatalog.get(name)
        if len(dicts) == 0:
            raise ValueError(f"Dataset '{name}' is empty. Check its annotation file.")
        start = time.perf_counter()
        bad = find_bad_images(dicts, mode)
        if mode != "off":
            logger.info(
                f"Dataset '{name}': checked {len(dicts)} images ({mode}) in "
                f"{time.perf_counter() - start:.1f} s"
            )
        if bad and skip_unreadable:
            if len(bad) == len(dicts):
                raise ValueError(f"Dataset '{name}': none of its {len(dicts)} images can be read.")
            logger.warning(
                f"Dataset '{name}': skipping {len(bad)} of {len(dicts)} images that cannot be read "
                f"(KD_TRAINER.SKIP_UNREADABLE_IMAGES), e.g. '{bad[0][0]}' {bad[0][1]}."
            )
            _drop_images(name, [f for f, _ in bad])
            bad_set = {f for f, _ in bad}
            dicts = [d for d in dicts if d["file_name"] not in bad_set]
        elif bad:
            missing = [f for f, reason in bad if reason == "does not exist"]
            if missing:
                raise FileNotFoundError(
                    f"Dataset '{name}': {len(missing)} of {len(dicts)} images do not exist, e.g. "
                    f"'{missing[0]}'. Fix the image root given when the dataset was registered "
                    "(for generated data: rerun tools/make_synthetic_coco.py --output <root>)."
                )
            shown = "; ".join(f"'{f}' {reason}" for f, reason in bad[:_SHOWN])
            raise ValueError(
                f"Dataset '{name}': {len(bad)} of {len(dicts)} images cannot be used: {shown}. "
                "Replace the file or remove its entry from the annotation file, or set "
                "KD_TRAINER.SKIP_UNREADABLE_IMAGES True to train without them."
            )
        source = _source(name)
        if not any(d.get("annotations") for d in dicts):
            if check_boxes:
                raise ValueError(
                    f"Dataset '{name}'{source} has no annotations at all (its annotation list is "
                    "empty, or no annotation names one of its images): there is nothing to train "
                    "on. Check the json's 'annotations' and their 'image_id's."
                )
            logger.warning(
                f"Dataset '{name}'{source} has no annotations at all: its AP is undefined (-1)."
            )
        invalid, clipped, empty = box_problems(dicts, geometry=check_boxes)
        if invalid:
            raise ValueError(
                f"Dataset '{name}'{source}: {len(invalid)} invalid boxes: "
                + "; ".join(invalid[:_SHOWN])
                + (" ..." if len(invalid) > _SHOWN else "")
                + ". Fix or remove these annotations (COCO boxes are [x, y, width, height] in "
                "pixels)."
            )
        if not check_boxes:
            continue
        if clipped or empty:
            logger.info(
                f"Dataset '{name}': {clipped} boxes lie partly outside their image and will be "
                f"clipped to it; {empty} zero-size boxes will be dropped (detectron2's mapper)."
            )
