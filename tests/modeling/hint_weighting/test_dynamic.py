"""Hint-dynamic weighting (HKD): the meta-weight network, its objective, the weight ensemble, and
its integration in DistillationRCNN (per-image weights, checkpoints, export, logging)."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from kd_det.modeling.hint_weighting.dynamic import (
    HINT_WEIGHTING_REGISTRY,
    HintWeighting,
    normalize_weights,
)
from kd_det.export.student import student_state_dict
from kd_det.utils.testing import random_batch

from conftest import distillation_cfg as _kd_cfg
from conftest import tiny_cfg as _cfg

DYNAMIC = ["MODEL.KD.HINT_WEIGHTING", "dynamic"]
FPN_ONLY_DYNAMIC = DYNAMIC + ["MODEL.KD.HINT.MIN_WEIGHT", "0.0"]
LOGIT_TERMS = [
    "MODEL.KD.RPN.OBJECTNESS_WEIGHT", "1.0",
    "MODEL.KD.RPN.DELTAS_WEIGHT", "1.0",
    "MODEL.KD.ROI.CLS_WEIGHT", "1.0",
    "MODEL.KD.ROI.BOX_WEIGHT", "1.0",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# A toy problem: K hints, each reading its own slice of a student tensor, and a detection loss.
# ----------------------------------------------------------------------------------------------
def _toy(n=2, k=2, seed=0, valid=None, scale=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * k, generator=g, requires_grad=True)
    target = torch.randn(n, 3 * k, generator=g)
    terms, inputs, det = {}, {}, 0.0
    for j in range(k):
        feat = x[:, 3 * j : 3 * j + 3] * 1.0  # the student tensor hint j reads
        alias = feat.view_as(feat)
        s = 1.0 if scale is None else scale[:, j : j + 1]
        values = ((alias - target[:, 3 * j : 3 * j + 3] * s) ** 2).mean(1)
        ok = torch.ones(n, dtype=torch.bool) if valid is None else valid[:, j]
        terms[f"loss_kd_h{j}"] = (values, ok, 1.0)
        inputs[f"loss_kd_h{j}"] = [(feat, alias, None)]
        det = det + ((feat - 1.0) ** 2).sum()
    return x, terms, inputs, det


def _randomize(hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hw.net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_weights_respond_to_each_images_discrepancy():
    hw = HintWeighting(["loss_kd_h0", "loss_kd_h1"], ensemble_weight=0.0, min_weight=0.0)
    _randomize(hw)
    # Image 1's teacher targets for hint 0 are 5x farther away: a different discrepancy.
    scale = torch.tensor([[1.0, 1.0], [5.0, 1.0]])
    _, terms, inputs, det = _toy(scale=scale)
    with EventStorage():
        w, _ = hw(terms, inputs, det, iteration=0)
    w = torch.stack([w["loss_kd_h0"], w["loss_kd_h1"]], 1)
    assert not torch.allclose(w[0], w[1], atol=1e-3)
    assert torch.allclose(w.mean(1), torch.ones(2))  # each image's mean weight is 1
    assert (w > 0).all()


def test_normalization_floor_and_invalid_hints():
    logits = torch.tensor([[5.0, 0.0, -5.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    w = normalize_weights(logits, valid, min_weight=0.2)
    assert torch.isfinite(w).all()
    assert torch.allclose(w[0].mean(), torch.tensor(1.0)) and w[0].min() >= 0.2
    assert w[1, 1] == 0 and torch.allclose(w[1, [0, 2]].mean(), torch.tensor(1.0))
    assert (w[2] == 0).all()


def test_ensemble_rule_combines_current_estimate_with_history():
    """used = renorm((1 - s) * current + s * EMA), then EMA <- m * EMA + (1 - m) * batch mean."""
    hw = HintWeighting(
        ["loss_kd_h0", "loss_kd_h1"], ensemble_weight=0.5, momentum=0.9, min_weight=0.0
    )
    hw.ema_weight.copy_(torch.tensor([0.5, 1.5]))
    valid = torch.tensor([[True, True], [True, False]])
    _, terms, inputs, det = _toy(valid=valid)
    with EventStorage():
        w, _ = hw(terms, inputs, det, iteration=0)  # zero-initialised net: current = 1
    assert torch.allclose(w["loss_kd_h0"], torch.tensor([0.75, 1.0]))
    assert torch.allclose(w["loss_kd_h1"], torch.tensor([1.25, 0.0]))
    assert torch.allclose(hw.ema_weight, torch.tensor([0.55, 1.45]))


def _meta_steps(blocks, steps=20, lr=0.5, n=4):
    """Train a fresh HintWeighting on a toy where hint j reads its own block of a student tensor.

    ``blocks[j] = (width, hint_fn, det_fn)``: hint j's per-image value and the block's
    detection loss, as functions of the block (rows = images). Returns the last weights.
    """
    names = [f"loss_kd_h{j}" for j in range(len(blocks))]
    x = torch.zeros(n, sum(b[0] for b in blocks), requires_grad=True)
    hw = HintWeighting(names, ensemble_weight=0.0, min_weight=0.0)
    opt = torch.optim.SGD(hw.parameters(), lr=lr)
    for it in range(steps):
        terms, inputs, det, start = {}, {}, 0.0, 0
        for name, (width, hint_fn, det_fn) in zip(names, blocks):
            feat = x[:, start : start + width] * 1.0
            alias = feat.view_as(feat)
            terms[name] = (hint_fn(alias), torch.ones(n, dtype=torch.bool), 1.0)
            inputs[name] = [(feat, alias, None)]
            det = det + det_fn(feat)
            start += width
        with EventStorage(start_iter=it):
            w, meta = hw(terms, inputs, det, iteration=it)
        opt.zero_grad()
        meta.backward()
        assert x.grad is None  # the meta loss never reaches the student
        opt.step()
    return [w[name].mean().item() for name in names]


def test_meta_objective_prefers_hints_that_agree_with_the_task():
    """Hint 0 pulls towards the detection target, hint 1 away from it: the meta steps move weight
    from hint 1 to hint 0 (and only the meta-net's parameters get gradients)."""
    w = _meta_steps(
        [
            (3, lambda f: ((f - 1.0) ** 2).mean(1), lambda f: ((f - 1.0) ** 2).sum()),
            (3, lambda f: ((f + 1.0) ** 2).mean(1), lambda f: ((f - 1.0) ** 2).sum()),
        ]
    )
    assert w[0] > 1.5 > 0.5 > w[1]


def test_disagreeing_hint_on_a_small_tensor_is_down_weighted():
    """Regression: a hint that opposes the task on a small tensor with a large gradient (like ROI
    logits next to FPN maps) must lose weight. In the raw concatenated gradient space it gained
    weight, because its large gradient diluted the others in the cosine; per-block normalisation
    compares directions only."""
    sign = torch.tensor([1.0, -1.0]).repeat(50)  # hint 0's target: orthogonal to the task's pull
    w = _meta_steps(
        [
            (100, lambda f: ((f - sign) ** 2).mean(1), lambda f: ((f - 1.0) ** 2).sum()),
            (3, lambda f: 100 * ((f + 1.0) ** 2).mean(1), lambda f: 0.01 * ((f - 1.0) ** 2).sum()),
        ]
    )
    assert w[1] < 0.5 < 1.5 < w[0]


def test_absent_hints_give_no_nan():
    # Hint 1 absent for image 0, hint 0 absent for the whole batch: image 0 has no hint at all.
    valid = torch.tensor([[False, False], [False, True]])
    hw = HintWeighting(["loss_kd_h0", "loss_kd_h1"])
    _randomize(hw)
    x, terms, inputs, det = _toy(valid=valid)
    with EventStorage() as storage:
        w, meta = hw(terms, inputs, det, iteration=0)
        meta.backward()
    w = torch.stack([w["loss_kd_h0"], w["loss_kd_h1"]], 1)
    assert torch.equal(w, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    assert torch.isfinite(meta)
    assert all(torch.isfinite(p.grad).all() for p in hw.parameters())
    for buf in hw.buffers():
        assert torch.isfinite(buf.float()).all()
    logged = storage.latest()
    assert "hint_weight/h1/mean" in logged and "hint_weight/h0/mean" not in logged


# ----------------------------------------------------------------------------------------------
# DistillationRCNN integration
# ----------------------------------------------------------------------------------------------
def _step(model, batch, seed=7, it=0):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with EventStorage(start_iter=it) as storage:
        losses = model(batch)
    return losses, storage


def test_hint_weighting_value_is_validated(tmp_path, teacher_ckpt):
    cfg = _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.HINT_WEIGHTING", "meta")
    with pytest.raises(ValueError, match="HINT_WEIGHTING='meta' is not one of 'fixed' | 'dynamic'"):
        build_model(cfg)
    cfg = _kd_cfg(tmp_path, teacher_ckpt, *DYNAMIC, "MODEL.KD.HINT.OBJECTIVE", "oracle")
    with pytest.raises(ValueError, match="OBJECTIVE='oracle'"):
        build_model(cfg)


@HINT_WEIGHTING_REGISTRY.register()
class DoubleEveryHint(torch.nn.Module):
    """A user's own hint weighting, registered from this test file: every weight 2."""

    def __init__(self, hint_names, **options):
        super().__init__()
        self.hint_names = list(hint_names)

    def forward(self, terms, hint_inputs, detection_loss, iteration):
        weights = {name: torch.full_like(values, 2.0) for name, (values, _, _) in terms.items()}
        return weights, detection_loss.detach() * 0.0


def test_user_registered_hint_weighting_is_named_in_yaml(tmp_path, teacher_ckpt):
    torch.manual_seed(0)
    fixed = build_model(_kd_cfg(tmp_path, teacher_ckpt))
    torch.manual_seed(0)
    user = build_model(
        _kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.HINT_WEIGHTING", "DoubleEveryHint")
    )
    assert isinstance(user.kd_hint_weights, DoubleEveryHint)
    assert user.kd_hint_weights.hint_names == user.hint_names
    l_fixed, _ = _step(fixed, random_batch())
    l_user, _ = _step(user, random_batch())
    assert l_user["loss_hint_meta"] == 0
    for name in user.hint_names:
        assert torch.allclose(l_user[name], 2 * l_fixed[name], rtol=1e-5), name


def test_fixed_weighting_has_no_meta_parts(tmp_path, teacher_ckpt):
    model = build_model(_kd_cfg(tmp_path, teacher_ckpt))
    assert model.kd_hint_weights is None
    assert not any(k.startswith("kd_hint_weights.") for k in model.state_dict())
    losses, _ = _step(model, random_batch())
    assert "loss_hint_meta" not in losses


def test_constant_network_equals_fixed_weighting(tmp_path, teacher_ckpt):
    """A meta-net frozen to output constants c (ensemble off, no floor) is fixed weighting with
    per-level weights c: same losses, same student gradients."""
    c = [0.5, 1.5, 1.0, 1.25, 0.75]  # sums to K = 5, so n * softmax(log c) = c
    fixed = build_model(_kd_cfg(tmp_path, teacher_ckpt, "MODEL.KD.FEATURE.WEIGHTS", str(c)))
    dyn = build_model(
        _kd_cfg(tmp_path, teacher_ckpt, *FPN_ONLY_DYNAMIC, "MODEL.KD.HINT.ENSEMBLE_WEIGHT", "0.0")
    )
    missing, unexpected = dyn.load_state_dict(fixed.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("kd_hint_weights.") for k in missing)
    last = dyn.kd_hint_weights.net.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(c).log())
    batch = random_batch(1)
    lf, _ = _step(fixed, batch)
    sum(lf.values()).backward()
    ld, _ = _step(dyn, batch)
    sum(ld.values()).backward()
    assert set(ld) == set(lf) | {"loss_hint_meta"}
    for k in lf:
        assert torch.allclose(ld[k], lf[k], rtol=1e-5, atol=1e-7), k
    grads_f = dict(fixed.named_parameters())
    for name, p in dyn.named_parameters():
        if name.startswith("kd_hint_weights."):
            continue
        g_f = grads_f[name].grad
        assert (p.grad is None) == (g_f is None), name
        if g_f is not None:
            assert torch.allclose(p.grad, g_f, rtol=1e-4, atol=1e-7), name


def test_per_image_weights_apply_to_their_image(tmp_path, teacher_ckpt):
    """loss_k = weight_k * sum_i(valid_ik * w_ik * value_ik) / sum_i(valid_ik), with w per image."""
    model = build_model(_kd_cfg(tmp_path, teacher_ckpt, *DYNAMIC, *LOGIT_TERMS))
    seen = {}
    terms_fn, hw_fwd = model.distillation_terms, model.kd_hint_weights.forward

    def record_terms(*a, **k):
        seen["terms"] = terms_fn(*a, **k)
        return seen["terms"]

    def fake_weights(terms, *a, **k):
        w, meta = hw_fwd(terms, *a, **k)
        seen["w"] = {n: torch.tensor([1.7, 0.3]) for n in w}  # image-specific weights
        return seen["w"], meta

    model.distillation_terms = record_terms
    model.kd_hint_weights.forward = fake_weights
    losses, _ = _step(model, random_batch(2))
    assert len(seen["terms"]) == 9  # 5 FPN levels + 4 logit terms
    for name, (values, valid, weight) in seen["terms"].items():
        v = valid.float()
        expected = weight * (v * seen["w"][name] * values).sum() / v.sum().clamp(min=1)
        assert torch.allclose(losses[name], expected, rtol=1e-6), name


def test_meta_net_is_trained_only_by_its_own_objective(tmp_path, teacher_ckpt):
    model = build_model(_kd_cfg(tmp_path, teacher_ckpt, *DYNAMIC, *LOGIT_TERMS))
    meta_params = dict(model.kd_hint_weights.named_parameters())
    student_params = {
        n: p for n, p in model.named_parameters() if not n.startswith("kd_hint_weights.")
    }
    losses, _ = _step(model, random_batch(3))
    student_loss = sum(v for k, v in losses.items() if k != "loss_hint_meta")
    student_loss.backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in meta_params.values())
    assert sum(p.grad is not None for p in student_params.values()) > 10
    model.zero_grad(set_to_none=True)
    losses["loss_hint_meta"].backward()
    assert all(p.grad is None for p in student_params.values())
    assert meta_params["net.layers.2.weight"].grad.abs().sum() > 0


def test_no_nan_when_hints_are_absent(tmp_path, teacher_ckpt):
    """Images without boxes have no foreground proposals (no ROI box hint), alone or in a batch."""
    model = build_model(_kd_cfg(tmp_path, teacher_ckpt, *DYNAMIC, *LOGIT_TERMS))
    for empty in ([1], [0, 1]):
        batch = random_batch(4)
        for i in empty:
            inst = Instances((64, 64))
            inst.gt_boxes = Boxes(torch.zeros(0, 4))
            inst.gt_classes = torch.zeros(0, dtype=torch.long)
            batch[i]["instances"] = inst
        losses, storage = _step(model, batch)
        sum(losses.values()).backward()
        for k, v in losses.items():
            assert torch.isfinite(v), (empty, k)
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (empty, n)
        if empty == [0, 1]:
            assert "hint_weight/roi_box/mean" not in storage.latest()


def test_weights_are_logged_per_hint(tmp_path, teacher_ckpt):
    model = build_model(_kd_cfg(tmp_path, teacher_ckpt, *DYNAMIC))
    _, storage = _step(model, random_batch(5))
    latest = storage.latest()
    for lvl in ("p2", "p3", "p4", "p5", "p6"):
        assert f"hint_weight/fpn_{lvl}/mean" in latest
        assert f"hint_weight/fpn_{lvl}/std" in latest
    assert any(k.startswith("hint_agreement/") for k in latest)


def test_no_grad_loss_pass_leaves_state_untouched(tmp_path, teacher_ckpt):
    """A validation-loss pass (training mode under no_grad) must not move the running state."""
    model = build_model(_kd_cfg(tmp_path, teacher_ckpt, *DYNAMIC))
    before = {k: v.clone() for k, v in model.kd_hint_weights.state_dict().items()}
    model.train()
    with torch.no_grad(), EventStorage():
        losses = model(random_batch(6))
    assert all(torch.isfinite(v) for v in losses.values())
    for k, v in model.kd_hint_weights.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_round_trip_and_export(tmp_path, teacher_ckpt):
    cfg = _kd_cfg(tmp_path, teacher_ckpt, *DYNAMIC, *LOGIT_TERMS)
    model = build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for it in range(2):
        losses, _ = _step(model, random_batch(it), it=it)
        sum(losses.values()).backward()
        opt.step()
    state = model.kd_hint_weights.state_dict()
    assert state["seen"].all() and not torch.equal(state["ema_log_value"], torch.zeros(9))
    assert state["net.layers.2.weight"].any()  # the meta-net was optimized
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")

    fresh = build_model(cfg)
    DetectionCheckpointer(fresh).load(str(tmp_path / "ckpt.pth"))
    for k, v in fresh.kd_hint_weights.state_dict().items():
        assert torch.equal(v, state[k]), k

    # The exported student holds neither the meta-net nor its state.
    ckpt = torch.load(tmp_path / "ckpt.pth")["model"]
    plain = build_model(_cfg(tmp_path))
    plain.load_state_dict(student_state_dict(ckpt), strict=True)
