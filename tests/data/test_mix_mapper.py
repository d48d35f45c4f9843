"""Property tests of MixedSampleDatasetMapper (kd_det/data/mix/mapper.py) on random images and
real photos: every output is checked against its ``mix_info`` record by
``mix_properties.check_output``, and the mapper against detectron2's ``DatasetMapper``."""

import copy

import numpy as np
import pytest
import torch
from conftest import MIX_PALETTE
from mix_properties import TYPES, check_output, make_mapper, run

from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.data import transforms as T
from kd_det.config import get_kd_cfg
from kd_det.data.mix import MixedSampleDatasetMapper


@pytest.mark.parametrize("mix_type", TYPES)
@pytest.mark.parametrize("box_rule", ["keep", "shrink"])
def test_properties_on_photos(photo_dicts, mix_type, box_rule):
    mapper = make_mapper(photo_dicts, mix_type, box_rule=box_rule)
    totals = {"dropped": 0, "kept_partner": 0, "shrunk": 0}
    for seed in range(12):
        out = run(mapper, photo_dicts, seed)
        assert out["mix_info"]["type"] == mix_type
        stats = check_output(out, mapper, photo_dicts[seed % len(photo_dicts)])
        totals = {k: totals[k] + stats[k] for k in totals}
    # The rules were exercised, not vacuously satisfied.
    assert totals["kept_partner"] > 5
    if mix_type != "mixup":
        assert totals["dropped"] > 0
    if box_rule == "shrink" and mix_type in ("cutmix", "cutnmix"):
        assert totals["shrunk"] > 0


@pytest.mark.parametrize("mix_type", TYPES)
def test_properties_on_random_tiny_images(noise_dicts, mix_type):
    """No resize: partners of very different sizes and aspect ratios, down to 3 x 5 pixels."""
    for rule, min_visible in (("keep", 0.0), ("shrink", 0.5), ("keep", 1.0)):
        mapper = make_mapper(
            noise_dicts, mix_type, augs=[T.RandomFlip()], box_rule=rule, min_visible=min_visible
        )
        for seed in range(18):
            out = run(mapper, noise_dicts, seed)
            check_output(out, mapper, noise_dicts[seed % len(noise_dicts)])


@pytest.mark.parametrize("mix_type", TYPES)
def test_boxes_still_frame_their_objects(colour_dicts, mix_type):
    """After augmentation and partner fitting, the centre of every box shows its object's colour."""
    mapper = make_mapper(colour_dicts, mix_type, box_rule="shrink", min_visible=0.2)
    checked = 0
    for seed in range(10):
        out = run(mapper, colour_dicts, seed)
        info = out["mix_info"]
        boxes = out["instances"].gt_boxes.tensor.numpy()
        for box, cls, k in zip(boxes, out["instances"].gt_classes.numpy(), info["instance_layer"]):
            if min(box[2] - box[0], box[3] - box[1]) < 6:
                continue
            layer = info["layers"][k]
            x, y = (
                int((box[0] + box[2]) / 2) - layer["region"][0],
                int((box[1] + box[3]) / 2) - layer["region"][1],
            )
            np.testing.assert_allclose(layer["pixels"][:, y, x].numpy(), MIX_PALETTE[cls], atol=8)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("fmt", ["L", "RGB", "BGR"])
def test_grayscale_and_formats(photo_dicts, fmt):
    for mix_type in TYPES:
        mapper = make_mapper(photo_dicts, mix_type, fmt=fmt)
        for seed in range(3):
            out = run(mapper, photo_dicts, seed)
            assert out["image"].shape[0] == (1 if fmt == "L" else 3)
            check_output(out, mapper, photo_dicts[seed % len(photo_dicts)])


def test_empty_annotations(photo_dicts):
    empty = [dict(d, annotations=[]) for d in photo_dicts]
    for mix_type in TYPES:
        out = run(make_mapper(empty, mix_type), empty, 0)
        assert len(out["instances"]) == 0
        # Unlabeled main image, labeled partners: their boxes arrive.
        mapper = make_mapper(photo_dicts, mix_type, min_visible=0.0, min_box_size=0.0)
        out = run(mapper, [empty[2]], 0)
        check_output(out, mapper, empty[2])


@pytest.mark.parametrize("enabled,prob", [(False, 1.0), (True, 0.0)])
def test_disabled_equals_dataset_mapper(photo_dicts, enabled, prob):
    cfg = get_kd_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (48, 64, 80)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIX.ENABLED = enabled
    cfg.INPUT.MIX.PROB = prob
    mixed = MixedSampleDatasetMapper(cfg, is_train=True, dataset_dicts=photo_dicts)
    plain = DatasetMapper(cfg, is_train=True)
    for seed in range(10):
        d = photo_dicts[seed % len(photo_dicts)]
        np.random.seed(seed)
        a = mixed(copy.deepcopy(d))
        np.random.seed(seed)
        b = plain(copy.deepcopy(d))
        assert a.keys() == b.keys()
        assert torch.equal(a["image"], b["image"]) and a["image"].dtype == b["image"].dtype
        assert a["instances"].get_fields().keys() == b["instances"].get_fields().keys()
        assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
        assert {k: v for k, v in a.items() if k not in ("image", "instances")} == {
            k: v for k, v in b.items() if k not in ("image", "instances")
        }


def test_output_format_matches_dataset_mapper(photo_dicts):
    """Mixed outputs have DatasetMapper's keys and field types (no mix_info unless asked)."""
    plain = DatasetMapper(True, augmentations=[T.Resize((64, 64))], image_format="RGB")
    ref = plain(copy.deepcopy(photo_dicts[0]))
    for mix_type in TYPES:
        mapper = make_mapper(
            photo_dicts, mix_type, augs=[T.Resize((64, 64))], return_mix_info=False
        )
        out = run(mapper, photo_dicts, 0, index=0)
        assert out.keys() == ref.keys()
        assert out["image"].shape == ref["image"].shape and out["image"].dtype == ref["image"].dtype
        assert out["instances"].get_fields().keys() == ref["instances"].get_fields().keys()
        assert out["instances"].gt_boxes.tensor.dtype == torch.float32
        assert out["instances"].gt_classes.dtype == torch.int64


def test_prob_and_reproducibility(photo_dicts):
    mapper = make_mapper(photo_dicts, "cutmix", mix_prob=0.5)
    mixed = [run(mapper, photo_dicts, s)["mix_info"]["type"] is not None for s in range(40)]
    assert 8 < sum(mixed) < 32
    # The stream starts from torch.initial_seed() in the mapping process: fresh mappers under the
    # same seeds agree, a different torch seed changes only the mixing.
    a = run(make_mapper(photo_dicts, "cutnmix"), photo_dicts, 3)
    b = run(make_mapper(photo_dicts, "cutnmix"), photo_dicts, 3)
    assert torch.equal(a["image"], b["image"])
    np.random.seed(3)
    torch.manual_seed(4)
    c = make_mapper(photo_dicts, "cutnmix")(copy.deepcopy(photo_dicts[3]))
    assert c["image"].shape == a["image"].shape  # same augmentation
    assert not torch.equal(a["image"], c["image"])


def test_config_validation_and_unsupported(photo_dicts):
    cfg = get_kd_cfg()
    cfg.INPUT.MIX.ENABLED = True
    bad = [
        ("TYPE", "cutout", "INPUT.MIX.TYPE"),
        ("PROB", 1.5, "INPUT.MIX.PROB"),
        ("PROB", -0.1, "INPUT.MIX.PROB"),
        ("ALPHA", 0.0, "INPUT.MIX.ALPHA"),
        ("NUM_PATCHES", 0, "INPUT.MIX.NUM_PATCHES"),
        ("MIN_VISIBLE", 1.2, "INPUT.MIX.MIN_VISIBLE"),
        ("MIN_BOX_SIZE", -1.0, "INPUT.MIX.MIN_BOX_SIZE"),
        ("BOX_RULE", "clip", "INPUT.MIX.BOX_RULE"),
    ]
    for key, value, name in bad:
        c = cfg.clone()
        c.INPUT.MIX[key] = value
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            MixedSampleDatasetMapper(c, is_train=True, dataset_dicts=photo_dicts)
    # Checked before the (here unregistered) training set would be loaded for partners.
    c = cfg.clone()
    c.DATASETS.TRAIN = ("kd_det_test_not_registered",)
    c.INPUT.MIX.TYPE = "mosaik"
    with pytest.raises(ValueError, match="INPUT.MIX.TYPE"):
        MixedSampleDatasetMapper(c, is_train=True)
    with pytest.raises(ValueError, match="PARTNER_CACHE_SIZE"):
        make_mapper(photo_dicts, "cutmix", partner_cache_size=-1)
    c = cfg.clone()
    c.MODEL.MASK_ON = True
    with pytest.raises(NotImplementedError, match="MASK_ON"):
        MixedSampleDatasetMapper(c, is_train=True, dataset_dicts=photo_dicts)
    c.INPUT.MIX.ENABLED = False  # a disabled mapper supports masks like DatasetMapper
    MixedSampleDatasetMapper(c, is_train=True)
    # Test-time mappers never mix and need no partners.
    assert not MixedSampleDatasetMapper(cfg, is_train=False)._active


def test_from_config_loads_registered_train_set_and_feeds_loader(photo_dicts):
    name = "kd_det_test_mix_photos"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: copy.deepcopy(photo_dicts))
    cfg = get_kd_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.INPUT.MIN_SIZE_TRAIN = (48,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIX.ENABLED = True
    cfg.INPUT.MIX.PROB = 1.0
    cfg.INPUT.MIX.TYPE = "mosaic"
    mapper = MixedSampleDatasetMapper(cfg, is_train=True)
    # FILTER_EMPTY_ANNOTATIONS drops the unlabeled photo, as the train loader does.
    assert len(mapper._partners) == len(photo_dicts) - 1
    batch = next(iter(build_detection_train_loader(cfg, mapper=mapper)))
    assert len(batch) == 2 and all(b["image"].dtype == torch.uint8 for b in batch)
    assert all("instances" in b for b in batch)


def test_the_original_module_path_still_imports_with_a_deprecation_warning():
    """User code written before the split imports from ``kd_det.data.mixed_sample_mapper``, and
    is told where the mapper lives now."""
    import importlib
    import sys

    sys.modules.pop("kd_det.data.mixed_sample_mapper", None)
    with pytest.warns(
        DeprecationWarning, match="import MixedSampleDatasetMapper .* from kd_det.data.mix"
    ):
        old = importlib.import_module("kd_det.data.mixed_sample_mapper")
    assert old.MixedSampleDatasetMapper is MixedSampleDatasetMapper
    assert set(old.__all__) >= {
        "MixedSampleDatasetMapper",
        "visible_geometry",
        "MIX_STRATEGY_REGISTRY",
    }
