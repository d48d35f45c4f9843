"""Mixed teacher-student pairs on tiny CPU models: a Faster R-CNN teacher for a RetinaNet student
and the reverse (levels paired by stride, unpaired levels reported, channel adapters), a Cascade
R-CNN teacher for feature terms, and terms that need a head the teacher lacks refused by name."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, R18, distillation_cfg, tiny_cfg
from kd_det.utils.testing import random_batch, save_random_detector, tiny_overrides

RETINA = os.path.join(CONFIGS, "Synthetic", "retinanet_R18_FPN.yaml")
SMALL_HEAD = ["MODEL.RETINANET.NUM_CONVS", "2"]
CASCADE = [
    "MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True",
]  # fmt: skip


@pytest.fixture(scope="module")
def retina_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("retina_teacher")
    opts = tiny_overrides(d) + SMALL_HEAD + ["MODEL.FPN.OUT_CHANNELS", "48"]
    return dict(save_random_detector(RETINA, d, opts, seed=321), config=RETINA)


@pytest.fixture(scope="module")
def cascade_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("cascade_teacher")
    opts = tiny_overrides(d) + CASCADE + ["MODEL.FPN.OUT_CHANNELS", "48"]
    return dict(save_random_detector(R18, d, opts, seed=5), config=R18)


def retina_student(tmp_path, teacher, *extra):
    """A tiny DistillationRetinaNet student of ``teacher`` (a fixture dict with its config)."""
    return tiny_cfg(
        tmp_path, *SMALL_HEAD,
        "MODEL.META_ARCHITECTURE", "DistillationRetinaNet",
        "MODEL.KD.TEACHER.CONFIG_FILE", teacher.get("config", R18),
        "MODEL.KD.TEACHER.WEIGHTS", teacher["path"],
        "MODEL.KD.TEACHER.OPTS", str(teacher["opts"]),
        "MODEL.KD.FEATURE.LOSS", "mse",
        "MODEL.KD.FEATURE.LEVELS", "['p3', 'p4', 'p5', 'p6', 'p7']",
        *extra,
        base=RETINA,
    )  # fmt: skip


def rcnn_student(tmp_path, teacher, *extra):
    """A tiny DistillationRCNN student (R18, P2-P6) of ``teacher``."""
    cfg = distillation_cfg(tmp_path, teacher, "MODEL.KD.FEATURE.LOSS", "mse", *extra)
    cfg.merge_from_list(["MODEL.KD.TEACHER.CONFIG_FILE", teacher["config"]])
    return cfg


def train_step(model, seed=0):
    model.train()
    with EventStorage():
        losses = model(random_batch(seed))
    sum(losses.values()).backward()
    return losses


def test_faster_rcnn_teacher_for_a_retinanet_student(tmp_path, teacher_ckpt, kd_log):
    model = build_model(retina_student(tmp_path, teacher_ckpt))
    # Reported before training: P7 (student) and P2 (teacher) have no partner of their stride.
    assert "student ['p7'], teacher ['p2']" in kd_log.text
    assert "['p7'] have no teacher level of the same stride" in kd_log.text
    assert model.level_pairs == {f"p{i}": f"p{i}" for i in range(3, 7)}
    assert set(model.kd_adapters.keys()) == {f"fpn_p{i}" for i in range(3, 7)}  # 32 -> 48
    losses = train_step(model)
    assert {k for k in losses if k.startswith("loss_kd_")} == {
        f"loss_kd_fpn_p{i}" for i in (3, 4, 5, 6)
    }
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in model.kd_adapters.parameters())


@pytest.mark.parametrize("key", ["MODEL.KD.DENSE.CLS_WEIGHT", "MODEL.KD.CROSSKD.BOX_WEIGHT"])
def test_head_terms_from_a_faster_rcnn_teacher_are_refused(tmp_path, teacher_ckpt, key):
    with pytest.raises(ValueError, match=f"{key} needs the teacher's dense head.*GeneralizedRCNN"):
        build_model(retina_student(tmp_path, teacher_ckpt, key, "1.0"))


def test_retinanet_teacher_for_a_faster_rcnn_student(tmp_path, retina_teacher, kd_log):
    model = build_model(rcnn_student(tmp_path, retina_teacher))  # default LEVELS: P2-P6
    assert "student ['p2'], teacher ['p7']" in kd_log.text
    assert model.level_pairs == {f"p{i}": f"p{i}" for i in range(3, 7)}
    losses = train_step(model)
    assert {k for k in losses if k.startswith("loss_kd_")} == {
        f"loss_kd_fpn_p{i}" for i in (3, 4, 5, 6)
    }
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize(
    "key", ["MODEL.KD.RPN.OBJECTNESS_WEIGHT", "MODEL.KD.ROI.CLS_WEIGHT", "MODEL.KD.ROI.BOX_WEIGHT"]
)
def test_rpn_and_roi_terms_from_a_retinanet_teacher_are_refused(tmp_path, retina_teacher, key):
    with pytest.raises(ValueError, match=f"{key} needs the teacher's .*the teacher is a RetinaNet"):
        build_model(rcnn_student(tmp_path, retina_teacher, key, "1.0"))


def test_cascade_teacher_gives_feature_terms_to_both_families(tmp_path, cascade_teacher):
    rcnn = build_model(
        rcnn_student(tmp_path, cascade_teacher, "MODEL.KD.RPN.OBJECTNESS_WEIGHT", "1.0")
    )
    assert {"loss_kd_fpn_p2", "loss_kd_rpn_objectness"} <= set(train_step(rcnn))
    retina = build_model(retina_student(tmp_path, cascade_teacher))
    losses = train_step(retina, seed=1)
    assert "loss_kd_fpn_p3" in losses and all(torch.isfinite(v) for v in losses.values())


def test_roi_terms_from_a_cascade_teacher_are_refused(tmp_path, cascade_teacher):
    cfg = rcnn_student(tmp_path, cascade_teacher, "MODEL.KD.ROI.CLS_WEIGHT", "1.0")
    with pytest.raises(ValueError, match="MODEL.KD.ROI.CLS_WEIGHT.*CascadeROIHeads"):
        build_model(cfg)
