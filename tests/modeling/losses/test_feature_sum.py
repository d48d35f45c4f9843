"""``MODEL.KD.FEATURE.LOSS feature_sum``: the weighted sum of registered feature losses (SSIM on
top of PKD), its config errors, and one training step of a DistillationRCNN that uses it."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.modeling.losses import (
    FEATURE_LOSS_REGISTRY,
    FeatureLossSum,
    PKDFeatureLoss,
    SSIMFeatureLoss,
    feature_loss_from_config,
)
from kd_det.utils.testing import random_batch

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sum_cfg(losses, weights, *extra):
    cfg = get_kd_cfg()
    cfg.merge_from_list(
        ["MODEL.KD.FEATURE_SUM.LOSSES", str(list(losses)),
         "MODEL.KD.FEATURE_SUM.WEIGHTS", str(list(weights))] + list(extra)
    )  # fmt: skip
    return cfg


def test_registered_and_built_from_the_config():
    assert "feature_sum" in {name for name, _ in FEATURE_LOSS_REGISTRY}
    cfg = _sum_cfg(["pkd", "ssim"], [12.0, 3.0], "MODEL.KD.SSIM.WINDOW_SIZE", "7",
                   "MODEL.KD.FEATURE.RANGE_POLICY", "minmax")  # fmt: skip
    loss = feature_loss_from_config(cfg, "feature_sum")
    assert isinstance(loss, FeatureLossSum) and loss.weights == (12.0, 3.0)
    pkd, ssim = loss.parts
    assert isinstance(pkd, PKDFeatureLoss) and isinstance(ssim, SSIMFeatureLoss)
    assert ssim.win_size == 7 and ssim.range_policy == "minmax"  # the SSIM keys reach the part
    assert "pkd: 12.0, ssim: 3.0" in repr(loss)


@pytest.mark.parametrize("per_image", [False, True])
def test_value_and_gradient_are_the_weighted_sum(per_image):
    teacher = _randn(2, 6, 16, 16, seed=0)
    base = 0.5 * teacher + _randn(2, 6, 16, 16, seed=1)
    weight_map = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    pkd, ssim = PKDFeatureLoss(), SSIMFeatureLoss(win_size=7, range_policy="minmax")
    combo = FeatureLossSum([pkd, ssim], [12.0, 3.0])

    def grad_of(fn):
        x = base.clone().requires_grad_()
        value = fn(x)
        value.sum().backward()
        return value.detach(), x.grad

    kw = dict(weight_map=weight_map, per_image=per_image)
    expected, g_exp = grad_of(lambda x: 12.0 * pkd(x, teacher, **kw) + 3.0 * ssim(x, teacher, **kw))
    value, g = grad_of(lambda x: combo(x, teacher, **kw))
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(g, g_exp)
    assert value.dtype == torch.float32 and value.shape == ((2,) if per_image else ())
    # Each part contributes: dropping SSIM changes the value.
    alone = FeatureLossSum([pkd], [12.0])(base, teacher, **kw)
    assert (value - alone).abs().min() > 1e-4


def test_one_weight_for_all_parts():
    loss = feature_loss_from_config(_sum_cfg(["mse", "l1"], [2.0]), "feature_sum")
    assert loss.weights == (2.0, 2.0)


@pytest.mark.parametrize(
    "losses, weights, match",
    [
        ([], [], "FEATURE_SUM.LOSSES is empty"),
        (["pkd", "ssim"], [1.0, 2.0, 3.0], "2 losses but 3 weights"),
        (["pkd", "feature_sum"], [1.0, 1.0], "recurse"),
        (["pkd", "nosuchloss"], [1.0, 1.0], "Unknown feature loss 'nosuchloss'"),
    ],
)
def test_config_errors(losses, weights, match):
    with pytest.raises(ValueError, match=match):
        feature_loss_from_config(_sum_cfg(losses, weights), "feature_sum")


def test_distillation_rcnn_trains_a_step_with_it(tmp_path):
    """The meta-architecture logs one ``loss_kd_fpn_<level>`` per level, as for any loss, and the
    student's gradient is finite (tiny R18 student, random tiny R18 teacher with wider FPN)."""
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
            "MODEL.KD.FEATURE.LOSS", "feature_sum",
            "MODEL.KD.FEATURE_SUM.LOSSES", "['pkd', 'ssim']",
            "MODEL.KD.FEATURE_SUM.WEIGHTS", "[12.0, 3.0]",
            "MODEL.KD.SSIM.WINDOW_SIZE", "3",
        ]  # fmt: skip
    )
    model = build_model(cfg)
    assert isinstance(model.feature_loss, FeatureLossSum)
    model.train()
    torch.manual_seed(0)
    with EventStorage():
        losses = model(random_batch())
        sum(losses.values()).backward()
    for lvl in ("p2", "p3", "p4", "p5", "p6"):
        assert torch.isfinite(losses[f"loss_kd_fpn_{lvl}"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
