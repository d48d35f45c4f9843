"""DistillationRCNN on tiny CPU models: equivalence with GeneralizedRCNN, teacher isolation,
loading errors, adapters and every distillation term."""

import copy

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.utils.events import EventStorage

from conftest import ALL_TERMS
from conftest import tiny_cfg as _cfg
from conftest import distillation_cfg as _kd_cfg
from kd_det.utils.testing import random_batch

KD_OFF = [
    "MODEL.KD.FEATURE.WEIGHTS", "[0.0]",
    "MODEL.KD.BACKBONE.LEVELS", "[]",
]  # fmt: skip
TERMS = {
    "loss_kd_fpn_p2", "loss_kd_fpn_p3", "loss_kd_fpn_p4", "loss_kd_fpn_p5", "loss_kd_fpn_p6",
    "loss_kd_backbone_res2", "loss_kd_rpn_objectness", "loss_kd_rpn_deltas", "loss_kd_roi_cls",
    "loss_kd_roi_box",
}  # fmt: skip


def _losses_and_grads(model, batch, seed=7):
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_zero_weights_equal_plain_generalized_rcnn(tmp_path, teacher_ckpt):
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, *KD_OFF))
    plain = build_model(_cfg(tmp_path))
    assert type(plain) is GeneralizedRCNN
    assert kd.teacher is None  # nothing distilled: no teacher built or run
    plain.load_state_dict(kd.state_dict())
    batch = random_batch()
    l_kd, g_kd = _losses_and_grads(kd, batch)
    l_pl, g_pl = _losses_and_grads(plain, batch)
    assert l_kd.keys() == l_pl.keys()
    for k in l_pl:
        assert torch.equal(l_kd[k], l_pl[k]), k
    assert g_kd.keys() == g_pl.keys()
    for k in g_pl:
        assert torch.equal(g_kd[k], g_pl[k]), k


def test_detection_losses_unchanged_by_distillation_terms(tmp_path, teacher_ckpt):
    """With every term on, the detection part of the loss is still exactly GeneralizedRCNN's
    (the ROI path that keeps proposals for the logit terms reproduces StandardROIHeads)."""
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, *ALL_TERMS))
    plain = build_model(_cfg(tmp_path))
    missing, unexpected = plain.load_state_dict(kd.state_dict(), strict=False)
    assert not missing and all(k.startswith("kd_adapters.") for k in unexpected)
    batch = random_batch(1)
    l_kd, _ = _losses_and_grads(kd, batch)
    l_pl, _ = _losses_and_grads(plain, batch)
    assert set(l_kd) == set(l_pl) | TERMS
    for k in l_pl:
        assert torch.allclose(l_kd[k], l_pl[k], rtol=1e-6, atol=1e-7), k
    for k in TERMS:
        assert torch.isfinite(l_kd[k]) and l_kd[k].dtype == torch.float32, k


def test_teacher_outside_module_tree_and_gets_no_gradient(tmp_path, teacher_ckpt):
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, *ALL_TERMS))
    teacher = kd.teacher
    t_params = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in t_params for p in kd.parameters())
    assert all(k.split(".")[0] != "_teacher" for k in kd.state_dict())
    assert not any("teacher" in name for name, _ in kd.named_modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    before = copy.deepcopy(teacher.state_dict())
    kd.train()
    assert not teacher.training
    _losses_and_grads(kd, random_batch(2))
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats frozen too
    # Adapters are trainable and receive gradients from the hint losses.
    assert set(kd.kd_adapters.keys()) == {f"fpn_p{i}" for i in range(2, 7)}
    assert all(p.grad is not None for p in kd.kd_adapters.parameters())


def test_different_label_space_refuses_logit_terms_only(tmp_path, teacher_ckpt):
    student_5 = ["MODEL.ROI_HEADS.NUM_CLASSES", "5"]
    cfg = _kd_cfg(tmp_path, teacher_ckpt, *student_5, "MODEL.KD.ROI.CLS_WEIGHT", "1.0")
    with pytest.raises(ValueError, match="teacher predicts 12 classes and the student 5"):
        build_model(cfg)
    model = build_model(_kd_cfg(tmp_path, teacher_ckpt, *student_5))  # feature terms only
    losses, _ = _losses_and_grads(model, random_batch(3, num_classes=5))
    assert "loss_kd_fpn_p2" in losses and "loss_kd_roi_cls" not in losses


def test_channel_mismatch_without_adapters_is_an_error(tmp_path, teacher_ckpt):
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.FEATURE.ADAPTER", "none")
    with pytest.raises(ValueError, match="student has 32 channels and the teacher 48"):
        build_model(cfg)


def test_student_checkpoint_loads_into_plain_detectron2(tmp_path, teacher_ckpt):
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, *ALL_TERMS))
    DetectionCheckpointer(kd, save_dir=str(tmp_path)).save("student")
    plain = build_model(_cfg(tmp_path))
    ckpt = torch.load(tmp_path / "student.pth")["model"]
    missing, unexpected = plain.load_state_dict(ckpt, strict=False)
    assert missing == []
    assert unexpected and all(k.startswith("kd_adapters.") for k in unexpected)


def test_inference_is_the_students(tmp_path, teacher_ckpt):
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, *ALL_TERMS)).eval()
    plain = build_model(_cfg(tmp_path)).eval()
    plain.load_state_dict(kd.state_dict(), strict=False)
    batch = [{"image": b["image"], "height": 64, "width": 64} for b in random_batch(4)]
    with torch.no_grad():
        a, b = kd(batch), plain(batch)
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)


def test_warmup_scales_distillation_terms(tmp_path, teacher_ckpt):
    kd = build_model(_kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.WARMUP_ITERS", "4"))
    kd.train()
    batch = random_batch(5)
    values = []
    for it in (0, 1, 10):
        torch.manual_seed(0)
        with EventStorage(start_iter=it):
            values.append(kd(batch)["loss_kd_fpn_p3"].item())
    assert values[0] == pytest.approx(values[2] * 0.25, rel=1e-5)
    assert values[1] == pytest.approx(values[2] * 0.5, rel=1e-5)
