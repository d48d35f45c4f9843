"""The meta objective's gradients (kd_det/modeling/hint_weighting/agreement.py): per-hint cosines
with the detection gradient that do not depend on the loss scale, and survive float16."""

import pytest
import torch

from kd_det.modeling.hint_weighting import agreement as hint_agreement
from kd_det.modeling.hint_weighting.agreement import gradient_agreement, hint_cosines

NAMES = ["loss_kd_a", "loss_kd_b"]


def _graph(dtype, weight=1.0, det_scale=1.0):
    """Two hints on two student tensors of ``dtype`` (as under autocast), each a per-image mean
    over a 2x4x64x64 map, and a detection loss on both; ``weight`` scales everything so the
    per-element gradients can be pushed below float16's range."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 64, 64, generator=gen).requires_grad_()
    targets = torch.randn(4, 2, 4, 64, 64, generator=gen)
    terms, inputs, det = {}, {}, 0.0
    for k, name in enumerate(NAMES):
        feat = (x[:, 4 * k : 4 * k + 4] * 1.0).to(dtype)
        alias = feat.view_as(feat)
        values = ((alias.float() - targets[k]) ** 2).mean((1, 2, 3))
        terms[name] = (values, torch.ones(2, dtype=torch.bool), weight)
        inputs[name] = [(feat, alias, None)]
        det = det + ((feat.float() - targets[2 + k]) ** 2).mean() * weight
    return terms, inputs, det * det_scale


def _cosines(dtype, **kw):
    terms, inputs, det = _graph(dtype, **kw)
    dot, g2, d2 = gradient_agreement(terms, inputs, det, NAMES, num_images=2)
    return hint_cosines(dot, g2, d2)[0]


def test_cosines_do_not_depend_on_the_detection_loss_scale():
    """Scaling the detection loss (a loss weight, a GradScaler) changes no cosine."""
    ref = _cosines(torch.float32)
    assert ref.abs().min() > 1e-3  # a real signal, not zeros
    for det_scale in (1e-4, 1e3):
        torch.testing.assert_close(_cosines(torch.float32, det_scale=det_scale), ref)


def test_float16_gradients_do_not_underflow(monkeypatch):
    """Per-element gradients near 2e-9 (a small loss weight on a mean over a map) flush to zero in
    float16; the scaled gradients give the float32 cosines. Unscaled, every cosine would be 0."""
    ref = _cosines(torch.float32, weight=1e-5)
    got = _cosines(torch.float16, weight=1e-5)
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=0)
    monkeypatch.setattr(hint_agreement, "FP16_GRAD_SCALE", 1.0)
    assert torch.count_nonzero(_cosines(torch.float16, weight=1e-5)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_scaling_outside_float16(monkeypatch, dtype):
    """float32 and bfloat16 (float32's exponent range) take the gradients unscaled."""
    seen = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(
        torch.autograd, "grad", lambda out, *a, **k: seen.append(out) or real_grad(out, *a, **k)
    )
    terms, inputs, det = _graph(dtype)
    gradient_agreement(terms, inputs, det, NAMES, num_images=2)
    assert len(seen) == 2 and torch.equal(seen[1], det)
