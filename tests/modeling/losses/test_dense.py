"""Dense-head KD terms (kd_det/modeling/losses/dense.py) against their formulas by hand."""

import math

import pytest
import torch
from detectron2.modeling.box_regression import Box2BoxTransform

from kd_det.modeling.losses import dense_box_per_image, dense_cls_per_image, foreground_anchors


def test_class_term_is_quality_focal_bce_by_hand():
    s = torch.tensor([[[0.3, -2.0], [1.5, 0.0]]])  # (N=1, R=2, K=2)
    t = torch.tensor([[[-1.0, -2.0], [2.0, 1.0]]])
    beta = 1.5
    values, valid = dense_cls_per_image(s, t, torch.tensor([2]), beta)
    total = 0.0
    for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist()):
        p, q = 1 / (1 + math.exp(-tv)), 1 / (1 + math.exp(-sv))
        total += -(p * math.log(q) + (1 - p) * math.log(1 - q)) * abs(q - p) ** beta
    assert values.item() == pytest.approx(total / 2, rel=1e-6)
    assert valid.tolist() == [True]
    # No foreground anchor: divided by 1, not by 0.
    values0, _ = dense_cls_per_image(s, t, torch.tensor([0]), beta)
    assert values0.item() == pytest.approx(total, rel=1e-6)


def test_class_term_is_zero_where_student_agrees_and_has_gradient_elsewhere():
    t = torch.randn(2, 50, 3)
    zero, _ = dense_cls_per_image(t.clone(), t, torch.tensor([4, 4]), 1.0)
    assert torch.all(zero == 0)
    s = torch.randn(2, 50, 3, requires_grad=True)
    values, _ = dense_cls_per_image(s, t, torch.tensor([4, 4]), 1.0)
    values.sum().backward()
    assert torch.all(values > 0) and s.grad.abs().sum() > 0
    # beta 0: plain soft BCE, whose minimum is the teacher's entropy, not 0.
    plain, _ = dense_cls_per_image(t.clone(), t, torch.tensor([1, 1]), 0.0)
    assert torch.all(plain > 0)


def test_foreground_is_ground_truth_or_confident_teacher():
    gt = torch.tensor([[3, -1, 0, 3]])  # 3 = background (K = 3), -1 ignored
    t = torch.full((1, 4, 3), -10.0)
    t[0, 3, 1] = 2.0  # sigmoid 0.88
    fg = foreground_anchors(gt, t, num_classes=3, score_thresh=0.5)
    assert fg.tolist() == [[False, False, True, True]]
    assert foreground_anchors(gt, t, 3, 1.0).tolist() == [[False, False, True, False]]


def test_box_term_l1_and_giou_on_foreground_only():
    b2b = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 4.0, 4.0]])
    t = torch.randn(2, 3, 4) * 0.1
    s = t.clone()
    s[0, 1] += torch.tensor([0.2, -0.1, 0.0, 0.3])
    s[0, 2] += 5.0  # a background anchor: ignored
    fg = torch.tensor([[True, True, False], [False, False, False]])
    values, valid = dense_box_per_image(s, t, anchors, fg, b2b, b2b, "l1")
    assert valid.tolist() == [True, False]
    assert values[0].item() == pytest.approx(0.6 / 4 / 2, rel=1e-6)  # mean over 2 anchors x 4
    assert values[1].item() == 0.0  # no foreground: invalid, and no NaN
    g, _ = dense_box_per_image(t.clone(), t, anchors, fg, b2b, b2b, "giou")
    assert g[0].item() == pytest.approx(0.0, abs=1e-6)
    g, _ = dense_box_per_image(s, t, anchors, fg, b2b, b2b, "giou")
    assert g[0].item() > 0


def test_box_term_reencodes_the_teacher_box_for_another_transform():
    """With other box weights, the L1 target is the teacher's box in the student's encoding."""
    s_b2b, t_b2b = Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    t = torch.tensor([[[1.0, -2.0, 0.5, 0.3]]])
    box = t_b2b.apply_deltas(t[0], anchors)
    s = s_b2b.get_deltas(anchors, box)[None]  # the same box, in the student's encoding
    values, _ = dense_box_per_image(s, t, anchors, torch.tensor([[True]]), s_b2b, t_b2b, "l1")
    assert values.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="BOX_LOSS"):
        dense_box_per_image(s, t, anchors, torch.tensor([[True]]), s_b2b, t_b2b, "l2")
