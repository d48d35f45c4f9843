"""Fault injection: data that used to train silently wrong, or stop with no file named.

Each case damages a private copy of the generated data (the json, or an image) and runs the
start-of-run checks (``check_inputs``, what ``KDTrainer`` runs before building the model). Every
case asserts that the run stops with the json file or the image named, and the words that say what
is wrong. ``DATASETS.COCO`` names that would replace each other are refused at registration.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import copy_dataset, edit_json

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def _cfg(tmp_path, root, prefix, *extra):
    from kd_det.data.builtin import register_datasets_from_config

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path / "out", root) + list(extra))
    cfg.merge_from_list(["DATASETS.TRAIN", f"('{prefix}_train',)"])
    cfg.merge_from_list(["DATASETS.TEST", f"('{prefix}_val',)"])
    cfg.freeze()
    register_datasets_from_config(cfg)
    return cfg


def _first_box(bbox, split="train"):
    def inject(root):
        edit_json(root / f"{split}.json", lambda d: d["annotations"][0].update(bbox=bbox))

    return inject


def _images(edit):
    return lambda root: edit_json(root / "train.json", lambda d: edit(d["images"]))


def _reencode(encoding, bom=b""):
    def inject(root):
        data = json.loads((root / "train.json").read_text())
        data["info"] = {"description": "scènes générées"}  # not ASCII
        (root / "train.json").write_bytes(
            bom + json.dumps(data, ensure_ascii=False).encode(encoding)
        )

    return inject


def _sixteen_bit(root):
    """The first training image as a 16-bit grayscale PNG (PIL mode I;16)."""
    first = sorted((root / "train").iterdir())[0]
    Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(root / "train" / "deep.png")

    def point_at_png(d):
        d["images"][0]["file_name"] = "deep.png"

    edit_json(root / "train.json", point_at_png)
    return first


def _no_annotations(split):
    return lambda root: edit_json(root / f"{split}.json", lambda d: d.update(annotations=[]))


def _set(key, value):
    return _images(lambda ims: ims[0].update({key: value}))


def _drop(*keys):
    return _images(lambda ims: [ims[0].pop(k) for k in keys])


def _duplicate_id(ims):
    ims[1]["id"] = ims[0]["id"]


# fault -> (injection, the file named in the message, words of the message)
DATA_FAULTS = {
    "duplicate_image_id": (_images(_duplicate_id), "train.json",
                           "used by more than one image (id 1: '000000.jpg', '000001.jpg')"),
    "missing_width": (_drop("width"), "train.json", "'000000.jpg' (images[0]) has no 'width'"),
    "missing_width_and_height": (_drop("width", "height"), "train.json", "no 'width', 'height'"),
    "width_is_a_string": (_set("width", "64"), "train.json", "has width '64', height 64"),
    "height_is_zero": (_set("height", 0), "train.json", "not a positive number"),
    "bbox_nan": (_first_box([float("nan"), 1.0, 5.0, 5.0]), "000000.jpg", "is not finite"),
    "bbox_infinite": (_first_box([1.0, 1.0, float("inf"), 5.0]), "000000.jpg", "is not finite"),
    "bbox_abc": (_first_box(["abc", 1.0, 5.0, 5.0]), "000000.jpg", "holds strings"),
    "bbox_numeric_strings": (_first_box(["1", "1", "5", "5"]), "000000.jpg", "holds strings"),
    "bbox_three_values": (_first_box([1.0, 1.0, 5.0]), "000000.jpg", "must hold 4 numbers"),
    "bbox_null": (_first_box([1.0, None, 5.0, 5.0]), "000000.jpg", "not numbers"),
    "val_bbox_nan": (_first_box([float("nan"), 1, 5, 5], "val"), "000000.jpg", "is not finite"),
    "empty_annotations": (_no_annotations("train"), "train.json", "has no annotations at all"),
    "latin1_json": (_reencode("latin-1"), "train.json", "is not UTF-8"),
    "utf16_json": (_reencode("utf-16"), "train.json", "is not UTF-8"),
    "utf8_bom_json": (_reencode("utf-8", b"\xef\xbb\xbf"), "train.json", "byte-order mark"),
    "png_16_bit": (_sixteen_bit, "deep.png", "has PIL mode I;16 (16-bit or float pixels)"),
}  # fmt: skip


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_bad_data_stops_naming_the_file(tmp_path, synthetic_root, fault):
    from kd_det.engine.trainer import check_inputs

    inject, named, words = DATA_FAULTS[fault]
    root = copy_dataset(synthetic_root, tmp_path / "data")
    inject(root)
    cfg = _cfg(tmp_path, root, "synthetic_fd_" + fault)
    with pytest.raises(ValueError) as info:
        check_inputs(cfg)
    msg = str(info.value)
    assert named in msg and words in msg, msg
    assert "Traceback" not in msg


@pytest.mark.parametrize("mode", ["decode", "header"])
def test_sixteen_bit_image_is_refused_in_either_check_mode(tmp_path, synthetic_root, mode):
    """The header holds the pixel mode: COCO-scale runs (header checks) refuse it too."""
    from kd_det.engine.trainer import check_inputs

    root = copy_dataset(synthetic_root, tmp_path / "data")
    _sixteen_bit(root)
    cfg = _cfg(tmp_path, root, "synthetic_fd16" + mode, "KD_TRAINER.CHECK_IMAGES", mode)
    with pytest.raises(ValueError, match=r"deep\.png' has PIL mode I;16"):
        check_inputs(cfg)


def test_a_test_set_without_annotations_only_warns(tmp_path, synthetic_root, kd_log):
    """Accepted (docs/troubleshooting.md): a test set without boxes has an undefined AP, but
    training on the training set is still right."""
    from kd_det.engine.trainer import check_inputs

    root = copy_dataset(synthetic_root, tmp_path / "data")
    _no_annotations("val")(root)
    check_inputs(_cfg(tmp_path, root, "synthetic_fd_empty_val"))
    assert "synthetic_fd_empty_val_val' (" in kd_log.text
    assert "has no annotations at all: its AP is undefined" in kd_log.text


def test_mask_on_without_masks_is_refused_at_start(tmp_path, synthetic_root):
    from kd_det.engine.trainer import check_inputs

    cfg = _cfg(tmp_path, synthetic_root, "synthetic", "MODEL.MASK_ON", "True")
    words = (
        r"MODEL.MASK_ON is True, but dataset 'synthetic_train' \(.*train\.json\) has boxes "
        r"without masks, e.g. image '.*000000.jpg', annotation index 0 has no "
        r"'segmentation'.*MODEL.MASK_ON False"
    )
    with pytest.raises(ValueError, match=words):
        check_inputs(cfg)


# ------------------------------------------------------------------------------------------------
# DATASETS.COCO names that would replace each other
# ------------------------------------------------------------------------------------------------


def _coco_cfg(tmp_path, entries):
    cfg = get_kd_cfg()
    cfg.merge_from_list(tiny_overrides(tmp_path / "out"))
    cfg.DATASETS.COCO = entries
    return cfg


def test_two_coco_entries_with_one_name_are_refused(tmp_path, synthetic_root):
    from kd_det.data.builtin import register_datasets_from_config

    train = [os.path.join(synthetic_root, "train.json"), os.path.join(synthetic_root, "train")]
    val = [os.path.join(synthetic_root, "val.json"), os.path.join(synthetic_root, "val")]
    cfg = _coco_cfg(tmp_path, [["fd_twice"] + train, ["fd_twice"] + val])
    with pytest.raises(ValueError, match="entries 0 and 1 are both named 'fd_twice'"):
        register_datasets_from_config(cfg)


@pytest.mark.parametrize("name", ["synthetic_train", "synthetic2_val", "synthetic_test"])
def test_a_coco_entry_named_like_the_generated_data_is_refused(tmp_path, synthetic_root, name):
    from kd_det.data.builtin import register_datasets_from_config

    entry = [name, os.path.join(synthetic_root, "val.json"), os.path.join(synthetic_root, "val")]
    with pytest.raises(ValueError, match=f"named '{name}', a name kd_det gives the generated"):
        register_datasets_from_config(_coco_cfg(tmp_path, [entry]))


def test_a_coco_entry_named_like_a_detectron2_dataset_is_refused(tmp_path, synthetic_root):
    from kd_det.data.builtin import register_datasets_from_config

    entry = ["coco_2017_val", os.path.join(synthetic_root, "val.json"),
             os.path.join(synthetic_root, "val")]  # fmt: skip
    with pytest.raises(ValueError, match="'coco_2017_val' is already registered"):
        register_datasets_from_config(_coco_cfg(tmp_path, [entry]))


def test_a_latin1_coco_json_is_named_at_registration(tmp_path, synthetic_root):
    from kd_det.data.builtin import register_datasets_from_config

    root = copy_dataset(synthetic_root, tmp_path / "data")
    _reencode("latin-1")(root)
    entry = ["fd_latin1", str(root / "train.json"), str(root / "train")]
    cfg = _coco_cfg(tmp_path, [entry])
    cfg.DATASETS.TRAIN = ("fd_latin1",)
    with pytest.raises(ValueError, match=r"train\.json' is not UTF-8.*re-save it as UTF-8"):
        register_datasets_from_config(cfg)
