"""Tests of kd_det.modeling.losses.cwd: CWD's value against its formula computed by hand and in
numpy, the temperature factor, invariances, reductions and refusals."""

import math

import numpy as np
import pytest
import torch

from kd_det.modeling.losses import CWDFeatureLoss


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _hand_case():
    """One image, two 2x2 channels. Channel 0: teacher (0, 0, 0, ln 5), student all 0. Channel 1:
    student and teacher identical."""
    teacher = torch.tensor([[[[0.0, 0.0], [0.0, math.log(5.0)]], [[1.0, -2.0], [0.5, 3.0]]]])
    student = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[1.0, -2.0], [0.5, 3.0]]]])
    return student, teacher


def test_value_by_hand_at_tau_1():
    """Channel 0: p = (1, 1, 1, 5) / 8, q = 1/4 everywhere, so
    KL = 3 * (1/8) * ln((1/8) / (1/4)) + (5/8) * ln((5/8) / (1/4)) = (3/8) ln(1/2) + (5/8) ln(5/2).
    Channel 1: KL = 0. The image's value is the channel mean, times tau^2 = 1."""
    student, teacher = _hand_case()
    kl0 = 3.0 / 8.0 * math.log(0.5) + 5.0 / 8.0 * math.log(2.5)
    assert CWDFeatureLoss(tau=1.0)(student, teacher).item() == pytest.approx(kl0 / 2, rel=1e-6)


def test_value_by_hand_at_tau_2_includes_the_tau_squared_factor():
    """At tau = 2 the teacher's channel 0 becomes p = (1, 1, 1, sqrt 5) / (3 + sqrt 5), q stays
    uniform, and the KL is multiplied by tau^2 = 4."""
    student, teacher = _hand_case()
    r5 = math.sqrt(5.0)
    z = 3.0 + r5
    kl0 = 3.0 * (1.0 / z) * math.log(4.0 / z) + (r5 / z) * math.log(4.0 * r5 / z)
    assert CWDFeatureLoss(tau=2.0)(student, teacher).item() == pytest.approx(
        4.0 * kl0 / 2, rel=1e-6
    )


def test_matches_numpy_formula_and_mmrazor_batch_reduction():
    """Per image tau^2 * mean_c sum_hw p log(p / q); the batch value is their mean, i.e. mmrazor's
    sum over all N * C channels divided by N * C."""
    tau = 3.0
    teacher = _randn(3, 5, 4, 6, seed=0) * 2.0
    student = 0.5 * teacher + _randn(3, 5, 4, 6, seed=1)

    def log_softmax(x):
        x = x.reshape(x.shape[0], x.shape[1], -1) / tau
        x = x - x.max(axis=2, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=2, keepdims=True))

    log_p = log_softmax(teacher.double().numpy())
    log_q = log_softmax(student.double().numpy())
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=2)  # (N, C)
    loss = CWDFeatureLoss(tau=tau)
    np.testing.assert_allclose(
        loss(student, teacher, per_image=True).numpy(), tau**2 * kl.mean(axis=1), rtol=1e-5
    )
    assert loss(student, teacher).item() == pytest.approx(tau**2 * kl.sum() / (3 * 5), rel=1e-5)


def test_zero_for_identical_maps_positive_otherwise_and_shift_invariant():
    teacher = _randn(2, 8, 10, 12, seed=0)
    student = teacher + 0.3 * _randn(2, 8, 10, 12, seed=1)
    loss = CWDFeatureLoss(tau=1.0)
    assert abs(loss(teacher.clone(), teacher).item()) < 1e-6
    base = loss(student, teacher, per_image=True)
    assert (base > 1e-3).all()
    # softmax over positions ignores a per-channel offset, but not a scale
    offset = torch.linspace(-20.0, 20.0, 8).view(1, 8, 1, 1)
    torch.testing.assert_close(loss(student + offset, teacher, per_image=True), base)
    assert not torch.allclose(loss(3.0 * student, teacher, per_image=True), base)


def test_weight_maps_are_refused():
    teacher = _randn(1, 2, 4, 4, seed=0)
    with pytest.raises(ValueError, match="FOREGROUND_WEIGHT"):
        CWDFeatureLoss()(teacher, teacher, torch.ones(1, 1, 4, 4))


def test_gradient_reaches_student_only_in_float32():
    teacher = _randn(2, 4, 6, 6, seed=0).requires_grad_()
    student = _randn(2, 4, 6, 6, seed=1).requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = CWDFeatureLoss(tau=4.0)(student.bfloat16(), teacher)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [dict(tau=0.0), dict(tau=-1.0), dict(range_policy="absmax")])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        CWDFeatureLoss(**kwargs)
