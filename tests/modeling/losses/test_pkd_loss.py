"""Tests of kd_det.modeling.losses.pkd: PKD's value against the Pearson correlation computed by
hand, its invariances, per-image statistics, weights and gradients."""

import numpy as np
import pytest
import torch

from kd_det.modeling.losses import PKDFeatureLoss, standardize_channels


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_value_is_one_minus_pearson_by_hand():
    """One image, two 2x2 channels.

    Channel 0: student 1 2 / 3 4, teacher 1 3 / 2 4. Both have mean 2.5 and population variance
    1.25; deviations (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5) have mean product 1.0, so
    r = 1.0 / 1.25 = 0.8 and the channel's loss is 1 - r = 0.2.
    Channel 1: student 0 0 / 0 2, teacher 2 0 / 0 0. Means 0.5, variances 0.75, deviations
    (-.5, -.5, -.5, 1.5) and (1.5, -.5, -.5, -.5) have mean product -0.25: r = -1/3, loss 4/3.
    The image's value is the mean over channels: (0.2 + 4/3) / 2.
    """
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 2.0]]]])
    teacher = torch.tensor([[[[1.0, 3.0], [2.0, 4.0]], [[2.0, 0.0], [0.0, 0.0]]]])
    loss = PKDFeatureLoss()
    expected = (0.2 + 4.0 / 3.0) / 2.0
    assert loss(student, teacher).item() == pytest.approx(expected, abs=1e-5)
    assert loss(student, teacher, per_image=True).shape == (1,)


def test_matches_numpy_formula_and_mmrazor_scaling():
    """0.5 * mean((z_s - z_t)^2) with per-image, per-channel population statistics (numpy), and
    for one image the batch-statistics formula of mmrazor's PKDLoss (unbiased std + 1e-6) times
    M / (M - 1), M = H * W: the two differ only by that variance convention."""
    student = _randn(3, 4, 5, 6, seed=1)
    teacher = 0.3 * student + _randn(3, 4, 5, 6, seed=2)
    s, t = student.double().numpy(), teacher.double().numpy()

    def z(x):
        mean = x.mean(axis=(2, 3), keepdims=True)
        return (x - mean) / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-6)

    per_image = 0.5 * ((z(s) - z(t)) ** 2).mean(axis=(1, 2, 3))
    loss = PKDFeatureLoss()
    np.testing.assert_allclose(loss(student, teacher, per_image=True).numpy(), per_image, rtol=1e-5)
    assert loss(student, teacher).item() == pytest.approx(per_image.mean(), rel=1e-5)

    def z_mmrazor(x):  # statistics over (N, H, W) per channel, unbiased std
        flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
        flat = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, ddof=1, keepdims=True) + 1e-6)
        return flat.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(1, 0, 2, 3)

    one_s, one_t = s[:1], t[:1]
    mmrazor = 0.5 * ((z_mmrazor(one_s) - z_mmrazor(one_t)) ** 2).mean()
    m = 5 * 6
    ours = loss(student[:1], teacher[:1]).item()
    assert ours == pytest.approx(mmrazor * m / (m - 1), rel=1e-4)


def test_zero_for_identical_maps_and_invariant_to_positive_affine_student():
    teacher = _randn(2, 8, 12, 10, seed=0) * 3.0 + 1.0
    student = 0.5 * teacher + _randn(2, 8, 12, 10, seed=1)
    loss = PKDFeatureLoss()
    assert abs(loss(teacher.clone(), teacher).item()) < 1e-5
    scale = torch.linspace(0.2, 5.0, 8).view(1, 8, 1, 1)
    offset = torch.linspace(-10.0, 10.0, 8).view(1, 8, 1, 1)
    base = loss(student, teacher, per_image=True)
    assert (base > 0.1).all()
    torch.testing.assert_close(
        loss(student * scale + offset, teacher, per_image=True), base, atol=1e-5, rtol=1e-5
    )
    # the teacher's magnitude does not matter either
    torch.testing.assert_close(loss(student, teacher * 7.0 - 3.0, per_image=True), base)
    # but a negative scale flips the correlation: per channel 1 - r becomes 1 + r
    flipped = loss(-student, teacher, per_image=True)
    torch.testing.assert_close(flipped, 2.0 - base, atol=1e-5, rtol=1e-5)


def test_statistics_are_per_image():
    """An image's value does not depend on the other images of its batch."""
    teacher = _randn(2, 4, 8, 8, seed=0)
    student = _randn(2, 4, 8, 8, seed=1)
    loss = PKDFeatureLoss()
    alone = loss(student[:1], teacher[:1], per_image=True)
    other = student.clone()
    other[1] = other[1] * 100.0 + 50.0 + _randn(4, 8, 8, seed=3)
    torch.testing.assert_close(loss(other, teacher, per_image=True)[:1], alone)


def test_weight_map_weights_the_squared_standardized_differences():
    teacher = _randn(2, 3, 6, 7, seed=0)
    student = _randn(2, 3, 6, 7, seed=1)
    weight = torch.rand(2, 1, 6, 7, generator=torch.Generator().manual_seed(2))
    terms = 0.5 * (standardize_channels(student) - standardize_channels(teacher)) ** 2
    per_image = (terms * weight).sum((1, 2, 3)) / (3 * weight.sum((1, 2, 3)))
    loss = PKDFeatureLoss()
    torch.testing.assert_close(loss(student, teacher, weight, per_image=True), per_image)
    total = (terms * weight).sum() / (3 * weight.sum())
    torch.testing.assert_close(loss(student, teacher, weight), total)


def test_gradient_reaches_student_only_and_constant_channels_stay_finite():
    teacher = _randn(2, 4, 6, 6, seed=0)
    teacher[:, 0] = 2.0  # constant teacher channel
    student = _randn(2, 4, 6, 6, seed=1)
    student[:, 1] = -1.0  # constant student channel
    student.requires_grad_()
    teacher.requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = PKDFeatureLoss()(student.bfloat16(), teacher)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same"):
        PKDFeatureLoss()(_randn(1, 4, 6, 6), _randn(1, 8, 6, 6))
