"""Fault injection: configs and extensions that used to fail unclearly or train silently wrong.

A duplicate YAML key and a ``_BASE_`` cycle (in the run's config or the teacher's), a user feature
loss of the wrong output shape. Each case asserts that the message names the file or the key, and
the fix. (Out-of-range values, the even SSIM window and ``EMA_DECAY 1.0`` among them, are cases
of tests/engine/test_fault_injection.py::test_bad_config_value_is_named.)
"""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from conftest import CONFIGS, REPO, distillation_cfg, tiny_overrides
from kd_det.config import ConfigFileError, get_kd_cfg
from kd_det.modeling.losses import FEATURE_LOSS_REGISTRY
from kd_det.utils.testing import random_batch, run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def _duplicate_key(d):
    path = d / "dup.yaml"
    path.write_text(f"_BASE_: {R18}\nSOLVER:\n  BASE_LR: 0.1\nSOLVER:\n  MAX_ITER: 4\n")
    return path, ["dup.yaml, line 4", "'SOLVER' twice (first at line 2)", "Merge the two"]


def _base_cycle(d):
    (d / "a.yaml").write_text("_BASE_: b.yaml\nSEED: 1\n")
    (d / "b.yaml").write_text("_BASE_: a.yaml\nSEED: 2\n")
    return d / "a.yaml", ["_BASE_ cycle", "a.yaml' -> ", "b.yaml' -> ", "Remove the _BASE_ entry"]


def _not_utf8(d):
    path = d / "latin1.yaml"
    path.write_bytes("# généré\nSEED: 3\n".encode("latin-1"))
    return path, ["latin1.yaml' is not UTF-8", "Re-save it as UTF-8"]


def _not_a_mapping(d):
    path = d / "list.yaml"
    path.write_text("- SEED\n- 3\n")
    return path, ["list.yaml' holds a list, not a mapping"]


CONFIG_FAULTS = {
    "duplicate_key": _duplicate_key,
    "base_cycle": _base_cycle,
    "not_utf8": _not_utf8,
    "not_a_mapping": _not_a_mapping,
}


@pytest.mark.parametrize("where", ["own_config", "teacher_config"])
@pytest.mark.parametrize("fault", sorted(CONFIG_FAULTS))
def test_config_file_fault_names_the_file(tmp_path, fault, where):
    from kd_det.modeling.teacher import build_teacher_cfg

    path, words = CONFIG_FAULTS[fault](tmp_path)
    with pytest.raises(ConfigFileError) as info:
        if where == "own_config":
            get_kd_cfg().merge_from_file(str(path))
        else:
            cfg = get_kd_cfg()
            cfg.MODEL.KD.TEACHER.CONFIG_FILE = str(path)
            build_teacher_cfg(cfg)
    for w in words:
        assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("fault", ["duplicate_key", "base_cycle"])
def test_train_net_reports_a_config_fault_without_a_traceback(tmp_path, fault):
    path, words = CONFIG_FAULTS[fault](tmp_path)
    proc = run_tool(REPO, "train_net.py", ["--config-file", str(path)] + tiny_overrides(tmp_path))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# a user feature loss of the wrong output shape
# ------------------------------------------------------------------------------------------------


@FEATURE_LOSS_REGISTRY.register()
class FaultMapLoss(nn.Module):
    """Forgets to reduce: returns the (N, C, H, W) map with per_image=True."""

    def __init__(self, cfg):
        super().__init__()

    def forward(self, student, teacher, weight_map=None, per_image=False):
        err = (student - teacher).abs()
        return err if per_image else err.mean()


@FEATURE_LOSS_REGISTRY.register()
class FaultScalarLoss(FaultMapLoss):
    """Ignores per_image: always a scalar."""

    def forward(self, student, teacher, weight_map=None, per_image=False):
        return (student - teacher).abs().mean()


@pytest.mark.parametrize("loss,got", [("FaultMapLoss", "(2, 48, "), ("FaultScalarLoss", "()")])
def test_user_loss_of_the_wrong_shape_is_named(tmp_path, teacher_ckpt, loss, got):
    cfg = distillation_cfg(tmp_path, teacher_ckpt, "MODEL.KD.FEATURE.LOSS", loss,
                           "MODEL.KD.FEATURE.LEVELS", "['p3']")  # fmt: skip
    model = build_model(cfg)
    model.train()
    with EventStorage(), pytest.raises(ValueError) as info:
        model(random_batch())
    msg = str(info.value)
    assert f"Feature loss {loss} (MODEL.KD.FEATURE.LOSS" in msg
    assert f"returned {got}" in msg and "must return a tensor of shape (2,)" in msg
    assert "flatten(1).mean(1)" in msg


@FEATURE_LOSS_REGISTRY.register()
class FaultGoodLoss(FaultMapLoss):
    """Reduces as the registry asks: (N,) per image."""

    def forward(self, student, teacher, weight_map=None, per_image=False):
        per = (student - teacher).abs().flatten(1).mean(1)
        return per if per_image else per.mean()


def test_a_right_user_loss_still_trains(tmp_path, teacher_ckpt):
    cfg = distillation_cfg(tmp_path, teacher_ckpt, "MODEL.KD.FEATURE.LOSS", "FaultGoodLoss",
                           "MODEL.KD.FEATURE.LEVELS", "['p3']")  # fmt: skip
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(random_batch())
    assert torch.isfinite(losses["loss_kd_fpn_p3"])
