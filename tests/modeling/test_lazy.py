"""LazyConfig models (kd_det/modeling/lazy.py): a ``.py`` teacher (a local file, and detectron2's
``new_baselines`` model zoo), loaded strictly like a YAML teacher; a LazyConfig student wrapped
by ``distill`` into the distillation model of its family."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.model_zoo import get_config
from detectron2.modeling import RetinaNet, build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, R18, distillation_cfg, tiny_cfg
from kd_det.modeling.lazy import distill, lazy_teacher_cfg
from kd_det.modeling.meta_arch import DistillationRCNN, DistillationRetinaNet
from kd_det.modeling.teacher import TeacherLoadError
from kd_det.utils.testing import random_batch

LAZY_RETINA = os.path.join(CONFIGS, "Synthetic", "lazy", "retinanet_R18_FPN.py")
LAZY_DISTILL = os.path.join(CONFIGS, "Synthetic", "lazy", "distill_retinanet_R18_mse.py")
RETINA = os.path.join(CONFIGS, "Synthetic", "retinanet_R18_FPN.yaml")
LEVELS = ["MODEL.KD.FEATURE.LEVELS", "['p3', 'p4', 'p5', 'p6', 'p7']"]


@pytest.fixture(scope="module")
def lazy_teacher(tmp_path_factory):
    """The LazyConfig RetinaNet R18 (64-channel FPN), random weights saved by detectron2."""
    d = tmp_path_factory.mktemp("lazy_teacher")
    torch.manual_seed(11)
    model = instantiate(LazyConfig.load(LAZY_RETINA).model)
    DetectionCheckpointer(model, save_dir=str(d)).save("teacher")
    return str(d / "teacher.pth")


def retina_student(tmp_path, *extra):
    return tiny_cfg(
        tmp_path, "MODEL.RETINANET.NUM_CONVS", "2",
        "MODEL.META_ARCHITECTURE", "DistillationRetinaNet", "MODEL.KD.FEATURE.LOSS", "mse",
        *LEVELS, *extra, base=RETINA,
    )  # fmt: skip


def one_step(model, seed=0):
    model.train()
    with EventStorage():
        losses = model(random_batch(seed))
    sum(losses.values()).backward()
    return losses


def test_summary_carries_what_the_checks_read(tmp_path):
    cfg = retina_student(tmp_path, "MODEL.KD.TEACHER.OPTS", "['model.num_classes=7']")
    summary = lazy_teacher_cfg(LAZY_RETINA, cfg)
    assert summary.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert summary.INPUT.FORMAT == "BGR" and summary.MODEL.RETINANET.NUM_CLASSES == 7
    assert tuple(summary.DATASETS.TRAIN) == ("synthetic_train",)
    assert summary.LAZY.FILE == LAZY_RETINA and summary.is_frozen()


def test_lazy_teacher_for_a_yacs_retinanet_student(tmp_path, lazy_teacher):
    cfg = retina_student(
        tmp_path,
        "MODEL.KD.TEACHER.CONFIG_FILE", LAZY_RETINA,
        "MODEL.KD.TEACHER.WEIGHTS", lazy_teacher,
        "MODEL.KD.DENSE.CLS_WEIGHT", "1.0",
        "MODEL.KD.DENSE.BOX_WEIGHT", "1.0",
    )  # fmt: skip
    model = build_model(cfg)
    teacher = model.teacher
    assert type(teacher) is RetinaNet and not teacher.training
    saved = torch.load(lazy_teacher, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in teacher.state_dict().items())  # loaded
    assert set(model.kd_adapters.keys()) == {f"fpn_p{i}" for i in range(3, 8)}  # 32 -> 64
    losses = one_step(model)
    assert {"loss_kd_fpn_p3", "loss_kd_dense_cls", "loss_kd_dense_box"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_lazy_teacher_weights_are_loaded_strictly(tmp_path, teacher_ckpt):
    """A checkpoint of another model (the R18 Faster R-CNN) does not fit the LazyConfig model."""
    cfg = retina_student(
        tmp_path, "MODEL.KD.TEACHER.CONFIG_FILE", LAZY_RETINA,
        "MODEL.KD.TEACHER.WEIGHTS", teacher_ckpt["path"],
    )  # fmt: skip
    with pytest.raises(TeacherLoadError, match="do not match the teacher config: .* missing keys"):
        build_model(cfg)


def test_model_zoo_new_baselines_teacher_for_feature_terms(tmp_path, teacher_ckpt):
    """detectron2's new_baselines Mask R-CNN (SyncBN, LSJ) as a LazyConfig teacher, random
    weights (no download): feature hints on P2-P6 of a tiny Faster R-CNN student train a step."""
    cfg = distillation_cfg(
        tmp_path, teacher_ckpt, "MODEL.KD.FEATURE.LOSS", "mse",
        "MODEL.KD.TEACHER.CONFIG_FILE", "model_zoo:new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py",
        "MODEL.KD.TEACHER.WEIGHTS", "", "MODEL.KD.TEACHER.ALLOW_RANDOM", "True",
        "MODEL.KD.TEACHER.OPTS", "[]",
    )  # fmt: skip
    model = build_model(cfg)
    assert type(model.teacher).__name__ == "GeneralizedRCNN"
    assert model.teacher.roi_heads.mask_on  # the new_baselines model itself
    losses = one_step(model)
    assert {f"loss_kd_fpn_p{i}" for i in range(2, 7)} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_distill_wraps_a_lazy_retinanet_student(tmp_path, lazy_teacher):
    cfg = LazyConfig.load(LAZY_DISTILL)
    assert cfg.model.kd_architecture == "DistillationRetinaNet"
    cfg.model.kd.TEACHER.CONFIG_FILE = LAZY_RETINA
    cfg.model.kd.TEACHER.WEIGHTS = lazy_teacher
    cfg.model.kd.CROSSKD = {"CLS_WEIGHT": 1.0, "BOX_WEIGHT": 1.0}
    with EventStorage():
        model = instantiate(cfg.model)
    assert isinstance(model, DistillationRetinaNet) and model.num_classes == 12
    assert not model.kd_adapters  # 64 channels on both sides: no adapter needed
    losses = one_step(model)
    assert {"loss_cls", "loss_kd_fpn_p7", "loss_kd_crosskd_cls", "loss_kd_crosskd_box"} <= set(
        losses
    )
    # The student's checkpoint is the plain LazyConfig RetinaNet's.
    plain = instantiate(LazyConfig.load(LAZY_RETINA).model)
    assert set(plain.state_dict()) == set(model.state_dict())


def test_distill_refuses_other_models_and_unknown_keys():
    with pytest.raises(ValueError, match="GeneralizedRCNN or a RetinaNet; got FCOS"):
        distill(get_config("common/models/fcos.py").model, kd={})
    node = distill(LazyConfig.load(LAZY_RETINA).model, kd={"FEATURE": {"LOSSS": "mse"}})
    with pytest.raises(KeyError, match="LOSSS"):
        instantiate(node)


def test_distill_wraps_a_lazy_generalized_rcnn_student(teacher_ckpt):
    """The model zoo's LazyConfig Faster R-CNN (its Mask R-CNN recipe, masks off) distilled from
    the tiny YAML R18 teacher: a DistillationRCNN whose detection losses are the recipe's own."""
    model = get_config("common/models/mask_rcnn_fpn.py").model
    model.roi_heads.update(mask_in_features=None, mask_pooler=None, mask_head=None)
    model.roi_heads.num_classes = 12
    kd = {
        "TEACHER": {"CONFIG_FILE": R18, "WEIGHTS": teacher_ckpt["path"],
                    "OPTS": teacher_ckpt["opts"]},
        "FEATURE": {"LOSS": "mse", "LEVELS": ["p2", "p3"]},
        "ROI": {"CLS_WEIGHT": 1.0},
    }  # fmt: skip
    node = distill(model, kd=kd)
    assert node.kd_architecture == "DistillationRCNN"
    student = instantiate(node)
    assert isinstance(student, DistillationRCNN)
    assert set(student.kd_adapters.keys()) == {"fpn_p2", "fpn_p3"}  # 256 -> 48 channels
    losses = one_step(student)
    assert {"loss_rpn_cls", "loss_cls", "loss_kd_fpn_p2", "loss_kd_roi_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
