"""The teacher: built from its own config, weights loaded completely or refused with the file and
the keys named, fed images in its own input format."""

import os

import pytest
import torch
from detectron2.modeling import build_model

from conftest import CONFIGS
from kd_det.modeling.teacher import TeacherInference, TeacherLoadError, build_teacher_cfg
from kd_det.utils.testing import random_batch
from conftest import ALL_TERMS
from conftest import distillation_cfg as _kd_cfg


def test_teacher_weights_really_loaded(tmp_path, teacher_ckpt):
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, *ALL_TERMS))
    saved = torch.load(teacher_ckpt["path"])["model"]
    for k, v in kd.teacher.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_missing_teacher_weights_file_is_named(tmp_path, teacher_ckpt):
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.TEACHER.WEIGHTS", "/nowhere/teacher.pth")
    with pytest.raises(TeacherLoadError, match="/nowhere/teacher.pth.*not found"):
        build_model(cfg)
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.TEACHER.WEIGHTS", "")
    with pytest.raises(TeacherLoadError, match="WEIGHTS is empty"):
        build_model(cfg)


def test_teacher_checkpoint_with_missing_keys_is_refused(tmp_path, teacher_ckpt):
    ckpt = torch.load(teacher_ckpt["path"])
    dropped = [k for k in ckpt["model"] if k.startswith("roi_heads.box_predictor")]
    for k in dropped:
        del ckpt["model"][k]
    bad = tmp_path / "partial.pth"
    torch.save(ckpt, bad)
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.TEACHER.WEIGHTS", str(bad))
    with pytest.raises(TeacherLoadError, match=r"partial\.pth.*missing keys.*box_predictor"):
        build_model(cfg)


def test_teacher_checkpoint_of_another_config_is_refused(tmp_path, teacher_ckpt):
    opts = teacher_ckpt["opts"] + ["MODEL.FPN.OUT_CHANNELS", "64"]
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.TEACHER.OPTS", str(opts))
    with pytest.raises(TeacherLoadError, match="shape mismatches.*backbone.fpn"):
        build_model(cfg)


def test_teacher_with_other_input_format_gets_converted_images(tmp_path, teacher_ckpt):
    opts = teacher_ckpt["opts"] + ["INPUT.FORMAT", "RGB"]
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.TEACHER.OPTS", str(opts)))
    batch = random_batch(6)
    converted = kd._teacher_inputs(batch)
    assert torch.equal(converted[0]["image"], batch[0]["image"][[2, 1, 0]])


def test_teacher_config_must_exist_and_be_a_plain_detector(tmp_path, teacher_ckpt):
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.TEACHER.CONFIG_FILE", "/nowhere/t.yaml")
    with pytest.raises(FileNotFoundError, match="/nowhere/t.yaml.*TEACHER.CONFIG_FILE"):
        build_teacher_cfg(cfg)
    online = os.path.join(CONFIGS, "Synthetic", "online_lite0_x2.yaml")
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.TEACHER.CONFIG_FILE", online)
    with pytest.raises(ValueError, match="itself a distillation model"):
        build_teacher_cfg(cfg)


def test_teacher_inference_converts_the_students_format():
    seen = []
    teacher = TeacherInference(lambda x: seen.append(x) or [], "BGR", "RGB")
    batch = random_batch(7)
    teacher(batch)
    assert torch.equal(seen[0][0]["image"], batch[0]["image"][[2, 1, 0]])
    with pytest.raises(ValueError, match="only RGB<->BGR"):
        TeacherInference(None, "BGR", "YUV-BT.601")
