"""DistillationRetinaNet on tiny CPU models: bit-equality with detectron2's RetinaNet when nothing
is distilled, teacher isolation, every term (feature hints, dense-head KD, CrossKD), the CrossKD
gradient path, and the pair checks (anchors, classes)."""

import copy
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import RetinaNet, build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, tiny_cfg
from kd_det.utils.testing import random_batch, save_random_detector, tiny_overrides

RETINA = os.path.join(CONFIGS, "Synthetic", "retinanet_R18_FPN.yaml")
#: Two tower blocks instead of four: the tests stay fast and CrossKD still has a hand-over.
SMALL_HEAD = ["MODEL.RETINANET.NUM_CONVS", "2"]
ALL_TERMS = [
    "MODEL.KD.FEATURE.WEIGHTS", "[1.0]",
    "MODEL.KD.FEATURE.FOREGROUND_WEIGHT", "1.0",
    "MODEL.KD.DENSE.CLS_WEIGHT", "1.0",
    "MODEL.KD.DENSE.BOX_WEIGHT", "1.0",
    "MODEL.KD.CROSSKD.CLS_WEIGHT", "1.0",
    "MODEL.KD.CROSSKD.BOX_WEIGHT", "1.0",
]  # fmt: skip
TERMS = {f"loss_kd_fpn_p{i}" for i in range(3, 8)} | {
    "loss_kd_dense_cls", "loss_kd_dense_box", "loss_kd_crosskd_cls", "loss_kd_crosskd_box"
}  # fmt: skip
KD_OFF = ["MODEL.KD.FEATURE.WEIGHTS", "[0.0]"]


@pytest.fixture(scope="module")
def retina_teacher(tmp_path_factory):
    """A saved tiny R18 RetinaNet teacher with 48 FPN channels (the 32-channel students need
    adapters, also at the CrossKD hand-over)."""
    d = tmp_path_factory.mktemp("retina_teacher")
    opts = tiny_overrides(d) + SMALL_HEAD + ["MODEL.FPN.OUT_CHANNELS", "48"]
    return save_random_detector(RETINA, d, opts, seed=321)


def student_cfg(tmp_path, *extra):
    """The tiny plain RetinaNet student."""
    return tiny_cfg(tmp_path, *SMALL_HEAD, *extra, base=RETINA)


def kd_cfg(tmp_path, teacher, *extra):
    return student_cfg(
        tmp_path,
        "MODEL.META_ARCHITECTURE", "DistillationRetinaNet",
        "MODEL.KD.TEACHER.CONFIG_FILE", RETINA,
        "MODEL.KD.TEACHER.WEIGHTS", teacher["path"],
        "MODEL.KD.TEACHER.OPTS", str(teacher["opts"]),
        "MODEL.KD.FEATURE.LEVELS", "['p3', 'p4', 'p5', 'p6', 'p7']",
        "MODEL.KD.FEATURE.LOSS", "mse",
        *extra,
    )  # fmt: skip


def losses_and_grads(model, batch, seed=7):
    """One training step's losses and gradients.

    RetinaNet's focal loss is a TorchScript function (fvcore's ``sigmoid_focal_loss_jit``): its
    profiling executor re-optimizes the graph after the first calls, so which call of the session
    it is, not which model, decides the last bits of the gradients (two plain RetinaNets differ
    otherwise). The executor's optimizations are off here, for every model compared.
    """
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    with EventStorage(), torch.jit.optimized_execution(False):
        losses = model(batch)
        sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def test_zero_weights_equal_plain_retinanet(tmp_path, retina_teacher):
    kd = build_model(kd_cfg(tmp_path, retina_teacher, *KD_OFF))
    plain = build_model(student_cfg(tmp_path))
    assert type(plain) is RetinaNet
    assert kd.teacher is None  # nothing distilled: no teacher built or run
    plain.load_state_dict(kd.state_dict())
    for step, seed in enumerate((0, 1)):  # two steps: the loss normalizer's EMA moves alike
        batch = random_batch(seed)
        l_kd, g_kd = losses_and_grads(kd, batch)
        l_pl, g_pl = losses_and_grads(plain, batch)
        assert l_kd.keys() == l_pl.keys() == {"loss_cls", "loss_box_reg"}
        for k in l_pl:
            assert torch.equal(l_kd[k], l_pl[k]), (step, k)
        assert g_kd.keys() == g_pl.keys() and len(g_pl) == len(list(plain.parameters()))
        for k in g_pl:
            assert torch.equal(g_kd[k], g_pl[k]), (step, k)
        assert kd.loss_normalizer == plain.loss_normalizer


def test_every_term_on_detection_losses_unchanged(tmp_path, retina_teacher):
    """The taps only record: with every term on, RetinaNet's own losses are still bit-equal."""
    kd = build_model(kd_cfg(tmp_path, retina_teacher, *ALL_TERMS))
    plain = build_model(student_cfg(tmp_path))
    missing, unexpected = plain.load_state_dict(kd.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("kd_adapters.") for k in unexpected)
    batch = random_batch(1)
    l_kd, _ = losses_and_grads(kd, batch)
    l_pl, _ = losses_and_grads(plain, batch)
    assert set(l_kd) == set(l_pl) | TERMS
    for k in l_pl:
        assert torch.equal(l_kd[k], l_pl[k]), k
    for k in TERMS:
        assert torch.isfinite(l_kd[k]) and l_kd[k].dtype == torch.float32, k
        assert l_kd[k] > 0, k


def test_teacher_outside_module_tree_and_frozen(tmp_path, retina_teacher):
    kd = build_model(kd_cfg(tmp_path, retina_teacher, *ALL_TERMS))
    teacher = kd.teacher
    t_params = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in t_params for p in kd.parameters())
    assert not any("teacher" in name for name, _ in kd.named_modules())
    assert all(k.split(".")[0] != "_teacher" for k in kd.state_dict())
    before = copy.deepcopy(teacher.state_dict())
    kd.train()
    assert not teacher.training
    losses_and_grads(kd, random_batch(2))
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    names = {f"fpn_p{i}" for i in range(3, 8)} | {"crosskd_cls", "crosskd_box"}
    assert set(kd.kd_adapters.keys()) == names  # 32 -> 48 channels everywhere
    assert all(p.grad is not None for p in kd.kd_adapters.parameters())


def test_crosskd_teaches_the_early_tower_through_the_teachers_head(tmp_path, retina_teacher):
    """CrossKD's gradient reaches the student's first tower block (and the FPN) through the
    frozen teacher's last block, never the student's own predictor or last block."""
    cross = ["MODEL.KD.CROSSKD.CLS_WEIGHT", "1.0", "MODEL.KD.CROSSKD.BOX_WEIGHT", "1.0"]
    kd = build_model(kd_cfg(tmp_path, retina_teacher, *KD_OFF, *cross))
    kd.train()
    with EventStorage():
        losses = kd(random_batch(3))
    (losses["loss_kd_crosskd_cls"] + losses["loss_kd_crosskd_box"]).backward()
    head = kd.head
    for tower in (head.cls_subnet, head.bbox_subnet):
        assert tower[0].weight.grad is not None and tower[0].weight.grad.abs().sum() > 0
        assert tower[2].weight.grad is None  # the student's last block: ground truth only
    assert head.cls_score.weight.grad is None and head.bbox_pred.weight.grad is None
    assert any(p.grad is not None for p in kd.backbone.parameters())


def test_inference_and_checkpoint_are_the_plain_retinanets(tmp_path, retina_teacher):
    kd = build_model(kd_cfg(tmp_path, retina_teacher, *ALL_TERMS)).eval()
    DetectionCheckpointer(kd, save_dir=str(tmp_path)).save("student")
    plain = build_model(student_cfg(tmp_path)).eval()
    ckpt = torch.load(tmp_path / "student.pth", weights_only=True)["model"]
    missing, unexpected = plain.load_state_dict(ckpt, strict=False)
    assert missing == [] and all(k.startswith("kd_adapters.") for k in unexpected)
    batch = [{"image": b["image"], "height": 64, "width": 64} for b in random_batch(4)]
    with torch.no_grad():
        for x, y in zip(kd(batch), plain(batch)):
            assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
            assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_warmup_scales_every_term(tmp_path, retina_teacher):
    kd = build_model(kd_cfg(tmp_path, retina_teacher, *ALL_TERMS, "MODEL.KD.WARMUP_ITERS", "4"))
    kd.train()
    batch = random_batch(5)
    values = []
    for it in (0, 10):
        torch.manual_seed(0)
        with EventStorage(start_iter=it):
            out = kd(batch)
        values.append({k: out[k].item() for k in TERMS})
    for k in TERMS:
        assert values[0][k] == pytest.approx(values[1][k] * 0.25, rel=1e-5), k


def test_other_anchors_refuse_head_terms(tmp_path, retina_teacher):
    cfg = kd_cfg(
        tmp_path, retina_teacher, *KD_OFF, "MODEL.KD.DENSE.CLS_WEIGHT", "1.0",
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", "[[1.0, 2.0, 0.5]]",
    )  # fmt: skip
    with pytest.raises(ValueError, match="anchor by anchor"):
        build_model(cfg)


def test_other_label_space_refuses_class_terms_only(tmp_path, retina_teacher):
    five = ["MODEL.RETINANET.NUM_CLASSES", "5"]
    cfg = kd_cfg(tmp_path, retina_teacher, *five, "MODEL.KD.DENSE.CLS_WEIGHT", "1.0")
    with pytest.raises(ValueError, match="teacher predicts 12 classes and the student 5"):
        build_model(cfg)
    box_only = ["MODEL.KD.DENSE.BOX_WEIGHT", "1.0", "MODEL.KD.DENSE.SCORE_THRESH", "0.0"]
    model = build_model(kd_cfg(tmp_path, retina_teacher, *five, *box_only))
    losses, _ = losses_and_grads(model, random_batch(6, num_classes=5))
    assert torch.isfinite(losses["loss_kd_dense_box"]) and "loss_kd_dense_cls" not in losses


@pytest.mark.parametrize(
    "key", ["MODEL.KD.RPN.OBJECTNESS_WEIGHT", "MODEL.KD.ROI.CLS_WEIGHT", "MODEL.KD.ROI.BOX_WEIGHT"]
)
def test_rcnn_terms_are_refused_by_name(tmp_path, retina_teacher, key):
    with pytest.raises(ValueError, match=f"{key} = 1.0: a RetinaNet student has no RPN"):
        build_model(kd_cfg(tmp_path, retina_teacher, key, "1.0"))
