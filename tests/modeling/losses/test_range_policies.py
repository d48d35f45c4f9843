"""Tests of kd_det.modeling.losses.normalize: the range policies applied before a feature loss."""

import pytest
import torch

from kd_det.modeling.losses import SSIMFeatureLoss, normalize_pair


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _scaled_offsets():
    """(2, 8, 32, 32) maps whose channels differ in scale (0.1..3) and offset (-5..5)."""
    offsets = torch.linspace(-5.0, 5.0, 8).view(1, 8, 1, 1)
    scales = torch.linspace(0.1, 3.0, 8).view(1, 8, 1, 1)
    return _randn(2, 8, 32, 32, seed=4) * scales + offsets


def test_normalize_pair_policies():
    teacher = _scaled_offsets()
    student = _randn(*teacher.shape, seed=7).requires_grad_()
    dims = (2, 3)

    s, t, r = normalize_pair(-teacher, teacher, "teacher_absmax")
    assert r == 1.0 and t.min() >= 0 and t.max() <= 1 and s.min() >= 0 and s.max() <= 1
    assert torch.allclose(t.abs().sub(0.5).abs().amax(dims), torch.ones(2, 8) * 0.5)

    s, t, r = normalize_pair(student, teacher, "teacher_minmax")
    assert r == 1.0
    assert torch.allclose(t.amin(dims), torch.zeros(2, 8), atol=1e-6)
    assert torch.allclose(t.amax(dims), torch.ones(2, 8), atol=1e-6)

    s, t, r = normalize_pair(student, teacher, "standardize")
    assert r == 6.0
    assert torch.allclose(t.mean(dims), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(t.std(dims, unbiased=False), torch.ones(2, 8), atol=1e-5)

    s, t, r = normalize_pair(student, teacher, "none")
    assert r is None and torch.equal(t, teacher) and torch.equal(s, student)

    with pytest.raises(ValueError, match="teacher_absmax"):
        normalize_pair(student, teacher, "absmax")


def test_normalize_pair_uses_detached_teacher_statistics():
    """The student's gradient is the plain affine factor 1 / scale: the statistics are constants."""
    teacher = _randn(1, 2, 5, 5, seed=0).requires_grad_()
    student = _randn(1, 2, 5, 5, seed=1).requires_grad_()
    s, t, _ = normalize_pair(student, teacher, "teacher_minmax")
    assert not t.requires_grad
    s.sum().backward()
    scale = (teacher.amax((2, 3)) - teacher.amin((2, 3))).detach()
    expected = (1.0 / scale).view(1, 2, 1, 1).expand(1, 2, 5, 5)
    torch.testing.assert_close(student.grad, expected)
    assert teacher.grad is None


def test_minmax_maps_each_level_by_its_own_range():
    """Hand-computed: each image's whole (C, H, W) map goes to [0, 1] with its own min/max."""
    student = torch.tensor([[[[1.0, 3.0]], [[-1.0, 5.0]]], [[[2.0, 2.5]], [[3.0, 4.0]]]])
    teacher = torch.tensor([[[[0.0, 10.0]], [[5.0, 2.5]]], [[[-4.0, 0.0]], [[-2.0, -3.0]]]])
    s, t, r = normalize_pair(student, teacher, "minmax")
    assert r == 1.0
    # image 0: student min -1, max 5 (range 6); teacher min 0, max 10
    # image 1: student min 2, max 4 (range 2); teacher min -4, max 0
    s_expected = torch.tensor([[[[2 / 6, 4 / 6]], [[0.0, 1.0]]], [[[0.0, 0.25]], [[0.5, 1.0]]]])
    t_expected = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]]], [[[0.0, 1.0]], [[0.5, 0.25]]]])
    torch.testing.assert_close(s, s_expected)
    torch.testing.assert_close(t, t_expected)


def test_minmax_differs_from_teacher_minmax_and_sees_only_shape():
    """teacher_minmax stretches every channel of the teacher to [0, 1]; minmax keeps the ratios
    between channels of a level, and a student off by a positive scale and offset is exact."""
    teacher = _scaled_offsets()
    _, t_level, _ = normalize_pair(teacher, teacher, "minmax")
    _, t_channel, _ = normalize_pair(teacher, teacher, "teacher_minmax")
    span = t_level.amax((2, 3)) - t_level.amin((2, 3))
    assert torch.allclose(t_channel.amax((2, 3)), torch.ones(2, 8), atol=1e-6)
    assert span.max() <= 1.0 and span.min() < 0.1  # the 0.1-scaled channel stays narrow
    torch.testing.assert_close(t_level.amin((1, 2, 3)), torch.zeros(2))
    torch.testing.assert_close(t_level.amax((1, 2, 3)), torch.ones(2))
    s, t, _ = normalize_pair(3.0 * teacher - 7.0, teacher, "minmax")
    torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-5)


def test_minmax_student_keeps_its_graph():
    """The student's own range is part of its graph (unlike the teacher_* policies)."""
    teacher = _randn(1, 2, 5, 5, seed=0)
    student = _randn(1, 2, 5, 5, seed=1).requires_grad_()
    s, t, _ = normalize_pair(student, teacher, "minmax")
    assert s.requires_grad and not t.requires_grad
    # d/dx of sum((x - lo) / (hi - lo)) has zero total: the sum over all entries of the
    # normalized map cannot be changed by shifting the student (shift invariance)
    s.sum().backward()
    assert abs(student.grad.sum().item()) < 1e-4


def test_minmax_ssim_ranks_a_flipped_student_worst():
    """Own-range min-max makes a flipped student 1 - teacher: SSIM's structure term is then -1,
    so the flip scores worse than a spatially unrelated student with the same values."""
    teacher = _randn(2, 8, 32, 32, seed=1)
    g = torch.Generator().manual_seed(10)
    unrelated = teacher[:, :, torch.randperm(32, generator=g)][
        :, :, :, torch.randperm(32, generator=g)
    ]
    noisy = teacher + 0.1 * _randn(2, 8, 32, 32, seed=2)
    loss = SSIMFeatureLoss(range_policy="minmax")
    assert loss.data_range == 1.0
    flip, other, close = (loss(x, teacher).item() for x in (-teacher, unrelated, noisy))
    assert close < 0.05 and flip > 1.0 and flip > other, (close, flip, other)
