"""The feature-loss registry: built-in names, errors, and a loss registered from user code (this
file) and named in the config of a DistillationRCNN and of an OnlineDistillationRCNN."""

import os
import re

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.modeling.losses import (
    FEATURE_LOSS_REGISTRY,
    CWDFeatureLoss,
    LpFeatureLoss,
    PKDFeatureLoss,
    SSIMFeatureLoss,
    feature_loss_from_config,
)
from kd_det.utils.testing import random_batch

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
LEVELS = ["p2", "p3", "p4", "p5", "p6"]


@FEATURE_LOSS_REGISTRY.register()
class ConstantTestLoss(nn.Module):
    """A user loss: returns ``VALUE`` per image (attached to the student) and records its calls."""

    VALUE = 0.25
    calls = []

    def __init__(self, cfg):
        super().__init__()
        self.tau = cfg.MODEL.KD.FEATURE.CWD_TAU  # reads the config it is built from

    def forward(self, student, teacher, weight_map=None, per_image=False):
        type(self).calls.append((tuple(student.shape), tuple(teacher.shape), student.requires_grad))
        per = student.float().flatten(1).sum(1) * 0.0 + self.VALUE
        return per if per_image else per.mean()


def _cfg(tmp_path, *extra):
    """A tiny R18 student (FPN 32 channels) and a RANDOM tiny R18 teacher with FPN 48 channels,
    so every level goes through a 1x1 adapter before the loss."""
    teacher_opts = tiny_overrides(tmp_path) + ["MODEL.FPN.OUT_CHANNELS", "48"]
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path))
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE", "DistillationRCNN",
            "MODEL.KD.TEACHER.CONFIG_FILE", R18,
            "MODEL.KD.TEACHER.WEIGHTS", "",
            "MODEL.KD.TEACHER.ALLOW_RANDOM", "True",
            "MODEL.KD.TEACHER.OPTS", str(teacher_opts),
            "MODEL.KD.BACKBONE.LEVELS", "[]",
        ]  # fmt: skip
        + list(extra)
    )
    return cfg


def _train_losses(model):
    model.train()
    torch.manual_seed(0)
    with EventStorage():
        losses = model(random_batch())
        sum(losses.values()).backward()
    return losses


def test_builtin_names_and_their_config_keys():
    cfg = get_kd_cfg()
    cfg.merge_from_list(
        [
            "MODEL.KD.SSIM.WINDOW_SIZE", "7",
            "MODEL.KD.SSIM.LOSS_FORM", "(1-ssim)/2",
            "MODEL.KD.FEATURE.CWD_TAU", "4.0",
        ]  # fmt: skip
    )
    assert {"ssim", "mse", "l1", "pkd", "cwd"} <= {name for name, _ in FEATURE_LOSS_REGISTRY}
    ssim = feature_loss_from_config(cfg, "ssim")
    assert isinstance(ssim, SSIMFeatureLoss) and ssim.win_size == 7
    assert ssim.loss_form == "(1-ssim)/2" and ssim.range_policy == "teacher_absmax"
    assert feature_loss_from_config(cfg, "SSIM").win_size == 7  # YAML written in capitals
    mse, l1 = feature_loss_from_config(cfg, "mse"), feature_loss_from_config(cfg, "l1")
    assert isinstance(mse, LpFeatureLoss) and (mse.norm, l1.norm) == ("mse", "l1")
    assert mse.range_policy == "none"
    assert isinstance(feature_loss_from_config(cfg, "pkd"), PKDFeatureLoss)
    cwd = feature_loss_from_config(cfg, "cwd")
    assert isinstance(cwd, CWDFeatureLoss) and cwd.tau == 4.0 and cwd.range_policy == "none"
    cfg.merge_from_list(["MODEL.KD.FEATURE.RANGE_POLICY", "teacher_absmax"])
    assert feature_loss_from_config(cfg, "l1").range_policy == "teacher_absmax"
    assert feature_loss_from_config(cfg, "cwd").range_policy == "teacher_absmax"


def test_unknown_name_lists_the_registered_ones():
    """The message lists every registered name, sorted: the built-ins, this file's user loss, and
    whatever other test modules collected in the same session registered (so the list is read
    back from the message rather than written out)."""
    with pytest.raises(ValueError, match="registered feature losses") as info:
        feature_loss_from_config(get_kd_cfg(), "kl")
    listed = re.search(r"registered feature losses: (.*?)\. Register", str(info.value)).group(1)
    names = re.findall(r"'([^']+)'", listed)
    assert names == sorted(names)
    assert set(names) == {name for name, _ in FEATURE_LOSS_REGISTRY}
    assert {"ConstantTestLoss", "cwd", "feature_sum", "l1", "mse", "pkd", "ssim"} <= set(names)


def test_unknown_name_in_yaml_stops_the_model_build(tmp_path):
    with pytest.raises(ValueError, match="registered feature losses"):
        build_model(_cfg(tmp_path, "MODEL.KD.FEATURE.LOSS", "sim"))


def test_user_registered_loss_named_in_yaml_is_used(tmp_path):
    """loss_kd_fpn_<level> = weight * mean over images of the loss's per-image values, and the
    loss sees the ADAPTED student (48 channels, like the teacher) for every level."""
    ConstantTestLoss.calls.clear()
    cfg = _cfg(
        tmp_path,
        "MODEL.KD.FEATURE.LOSS", "ConstantTestLoss",
        "MODEL.KD.FEATURE.WEIGHTS", "[2.0]",
        "MODEL.KD.FEATURE.CWD_TAU", "3.0",
    )  # fmt: skip
    model = build_model(cfg)
    assert isinstance(model.feature_loss, ConstantTestLoss) and model.feature_loss.tau == 3.0
    losses = _train_losses(model)
    for lvl in LEVELS:
        assert losses[f"loss_kd_fpn_{lvl}"].item() == pytest.approx(2.0 * ConstantTestLoss.VALUE)
    assert len(ConstantTestLoss.calls) == len(LEVELS)
    for s_shape, t_shape, grad in ConstantTestLoss.calls:
        assert s_shape == t_shape and s_shape[:2] == (2, 48) and grad


@pytest.mark.parametrize("name", ["pkd", "cwd"])
def test_new_losses_train_through_adapters(tmp_path, name):
    """32-channel student, 48-channel teacher: the loss is finite and positive on every level with
    more than one pixel (P6 of a 64-px image is 1x1: a single position has no spatial pattern, so
    both losses are exactly 0 there), and its gradient reaches the adapters and the student's FPN.
    """
    model = build_model(_cfg(tmp_path, "MODEL.KD.FEATURE.LOSS", name))
    assert set(model.kd_adapters.keys()) == {f"fpn_{lvl}" for lvl in LEVELS}
    losses = _train_losses(model)
    for lvl in LEVELS[:-1]:
        value = losses[f"loss_kd_fpn_{lvl}"]
        assert torch.isfinite(value) and value.item() > 0, (lvl, value)
    assert losses["loss_kd_fpn_p6"].item() == 0.0
    for lvl in LEVELS[:-1]:
        # only the weights: both losses ignore a per-channel offset, so the bias gets no gradient
        grad = model.kd_adapters[f"fpn_{lvl}"].weight.grad
        assert grad is not None and grad.abs().sum() > 0, lvl
    fpn_out = model.backbone.fpn_output2.weight
    assert fpn_out.grad is not None and fpn_out.grad.abs().sum() > 0


ONLINE = os.path.join(CONFIGS, "Synthetic", "online_lite0_R18.yaml")
LITE0 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite0_FPN.yaml")


def _online_cfg(tmp_path, name):
    """Two tiny Lite0 peers with FPN widths 32 and 48 (adapters both ways), only the mutual
    feature term on, at weight 3."""
    tiny = tiny_overrides(tmp_path)
    peer_opts = [
        x for k, v in zip(tiny[0::2], tiny[1::2]) if k.startswith("MODEL.") for x in (k, v)
    ]
    cfg = get_kd_cfg()
    cfg.merge_from_file(ONLINE)
    cfg.merge_from_list(tiny)
    cfg.merge_from_list(
        [
            "MODEL.ONLINE_KD.PEERS", str([LITE0, LITE0]),
            "MODEL.ONLINE_KD.PEER_OPTS", str(peer_opts + ["peer1:MODEL.FPN.OUT_CHANNELS", "48"]),
            "MODEL.ONLINE_KD.FEATURE_LOSS", name,
            "MODEL.ONLINE_KD.FEATURE_WEIGHTS", "[3.0]",
            "MODEL.ONLINE_KD.MUTUAL_WARMUP", "0",
            "MODEL.ONLINE_KD.LOGIT_WEIGHT", "0.0",
            "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[0.0]",
            "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "0.0",
            "MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "0.0",
        ]  # fmt: skip
    )
    return cfg


def test_online_mutual_term_uses_the_registry(tmp_path):
    """MODEL.ONLINE_KD.FEATURE_LOSS names a user loss: every mutual level term is 3 * VALUE and the
    loss sees the adapted map of each direction (48 channels toward peer1, 32 toward peer0)."""
    ConstantTestLoss.calls.clear()
    model = build_model(_online_cfg(tmp_path, "ConstantTestLoss"))
    assert isinstance(model.feature_loss, ConstantTestLoss)
    losses = _train_losses(model)
    for i, j in ((0, 1), (1, 0)):
        for lvl in LEVELS:
            value = losses[f"loss_kd_peer{i}_fpn_{lvl}_from_peer{j}"].item()
            assert value == pytest.approx(3.0 * ConstantTestLoss.VALUE)
    assert sorted({s[1] for s, _, _ in ConstantTestLoss.calls}) == [32, 48]
    assert len(ConstantTestLoss.calls) == 2 * len(LEVELS)


@pytest.mark.parametrize("name", ["pkd", "cwd"])
def test_online_mutual_term_with_new_losses(tmp_path, name):
    model = build_model(_online_cfg(tmp_path, name))
    assert isinstance(model.feature_loss, {"pkd": PKDFeatureLoss, "cwd": CWDFeatureLoss}[name])
    losses = _train_losses(model)
    for i, j in ((0, 1), (1, 0)):
        for lvl in LEVELS[:-1]:
            value = losses[f"loss_kd_peer{i}_fpn_{lvl}_from_peer{j}"]
            assert torch.isfinite(value) and value.item() > 0, (i, lvl, value)
    assert model.kd_adapters["p0_to_p1_p2"].weight.grad.abs().sum() > 0
