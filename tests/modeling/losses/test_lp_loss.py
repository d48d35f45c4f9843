"""Tests of kd_det.modeling.losses.lp: the MSE and L1 feature-hint baselines."""

import torch
import torch.nn.functional as F

from kd_det.modeling.losses import LpFeatureLoss, normalize_pair


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def test_lp_losses_match_torch_functional():
    teacher = _randn(2, 4, 10, 12, seed=0)
    student = _randn(2, 4, 10, 12, seed=1).requires_grad_()
    mse, l1 = LpFeatureLoss("mse"), LpFeatureLoss("l1")
    assert mse.range_policy == "none"
    torch.testing.assert_close(mse(student, teacher), F.mse_loss(student, teacher))
    torch.testing.assert_close(l1(student, teacher), F.l1_loss(student, teacher))
    torch.testing.assert_close(
        mse(student, teacher, per_image=True),
        F.mse_loss(student, teacher, reduction="none").mean((1, 2, 3)),
    )
    weight = torch.rand(2, 1, 10, 12, generator=_gen(3))
    expected = (F.l1_loss(student, teacher, reduction="none") * weight).sum() / (4 * weight.sum())
    torch.testing.assert_close(l1(student, teacher, weight), expected)
    s, t, _ = normalize_pair(student, teacher, "standardize")
    torch.testing.assert_close(
        LpFeatureLoss("mse", "standardize")(student, teacher), F.mse_loss(s, t)
    )
    teacher.requires_grad_()
    mse(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_lp_rejects_unknown_norm_and_policy():
    for kwargs in (dict(norm="l2"), dict(norm="mse", range_policy="absmax")):
        try:
            LpFeatureLoss(**kwargs)
        except ValueError:
            continue
        raise AssertionError(f"LpFeatureLoss({kwargs}) was accepted")
