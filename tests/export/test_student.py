"""kd_det/export/student.py: a distilled student becomes a plain detectron2 detector (weights
without distillation keys, a config detectron2 builds), checked before anything is written."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import GeneralizedRCNN, build_model

from conftest import CONFIGS, tiny_overrides
from kd_det.utils.testing import save_random_detector
from kd_det.config import get_kd_cfg
from kd_det.export.student import (
    ExportError,
    export_student,
    plain_student_cfg,
    student_state_dict,
)
from kd_det.export.members import member_state_dict

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def _student_cfg(tmp_path, teacher_ckpt):
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(
        tiny_overrides(tmp_path)
        + [
            "MODEL.META_ARCHITECTURE", "DistillationRCNN",
            "MODEL.KD.TEACHER.CONFIG_FILE", R18,
            "MODEL.KD.TEACHER.WEIGHTS", teacher_ckpt["path"],
            "MODEL.KD.TEACHER.OPTS", str(teacher_ckpt["opts"]),
        ]  # fmt: skip
    )
    return cfg


def test_student_state_dict_drops_only_distillation_keys():
    state = {"backbone.w": 1, "kd_adapters.fpn_p2.weight": 2, "kd_hint_weights.net.b": 3}
    assert student_state_dict(state) == {"backbone.w": 1}


def test_plain_config_has_only_detectron2_keys(tmp_path, teacher_ckpt):
    plain = plain_student_cfg(_student_cfg(tmp_path, teacher_ckpt), "/w/model_final.pth")
    assert plain.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert plain.MODEL.WEIGHTS == "/w/model_final.pth" and "KD" not in plain.MODEL
    reference = get_cfg()
    reference.merge_from_other_cfg(plain)  # loads into plain detectron2


def test_exported_student_loads_strictly_into_generalized_rcnn(tmp_path, teacher_ckpt):
    cfg = _student_cfg(tmp_path, teacher_ckpt)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("student")
    out = export_student(cfg, str(tmp_path / "student.pth"), str(tmp_path / "export"))
    assert out["dropped_keys"] == len(model.kd_adapters.state_dict()) > 0
    plain_cfg = get_cfg()
    plain_cfg.merge_from_file(out["config"])
    plain = build_model(plain_cfg)
    assert type(plain) is GeneralizedRCNN
    plain.load_state_dict(torch.load(out["weights"], weights_only=False)["model"], strict=True)


def test_member_only_for_online_configs(tmp_path, teacher_ckpt):
    cfg = _student_cfg(tmp_path, teacher_ckpt)
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("student")
    with pytest.raises(ValueError, match="--member only applies"):
        export_student(cfg, str(tmp_path / "student.pth"), str(tmp_path / "x"), member="peer0")
    with pytest.raises(FileNotFoundError, match="not found"):
        export_student(cfg, str(tmp_path / "missing.pth"), str(tmp_path / "y"))
    assert issubclass(ExportError, RuntimeError)


def test_member_state_dict_strips_the_members_prefix():
    state = {"peers.0.w": 1, "peers.1.w": 2, "ema_peers.1.w": 3, "kd_adapters.p0_to_p1_p2.b": 4}
    assert member_state_dict(state, "peer1") == {"w": 2}
    assert member_state_dict(state, "ema1") == {"w": 3}
    with pytest.raises(KeyError, match="no weights of member 'ema0'"):
        member_state_dict(state, "ema0")
    with pytest.raises(ValueError, match="not a member"):
        member_state_dict(state, "student")


def test_exporting_a_lite_student_does_not_warn_about_frozen_bn(tmp_path, kd_log):
    """The export check builds the student without ImageNet weights; its weights are the
    checkpoint's, so the "FrozenBN with random weights" warning would be false."""
    lite0 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite0_FPN.yaml")
    ckpt = save_random_detector(lite0, tmp_path, ["MODEL.FPN.OUT_CHANNELS", "32"], name="student")
    cfg = get_kd_cfg()
    cfg.merge_from_file(lite0)
    cfg.merge_from_list(ckpt["opts"])
    kd_log.clear()
    out = export_student(cfg, ckpt["path"], str(tmp_path / "export"))
    assert os.path.exists(out["weights"])
    assert not [r for r in kd_log if "FrozenBN" in r.getMessage()]
