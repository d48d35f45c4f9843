"""ROI and RPN terms and the per-image reduction shared by offline and online distillation."""

import torch
from detectron2.structures import Instances

from kd_det.modeling.losses import (
    log_probs,
    masked_mean,
    mean_log_probs,
    roi_box_per_image,
    roi_kl_per_image,
    rpn_per_image,
)


def _sampled(classes_per_image, num_classes=3):
    out = []
    for classes in classes_per_image:
        inst = Instances((8, 8))
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        out.append(inst)
    return out


def test_kl_is_zero_for_the_same_logits_and_scaled_by_t_squared():
    torch.manual_seed(0)
    s = torch.randn(5, 4)
    values, valid = roi_kl_per_image(s, log_probs(s, 2.0), [3, 2, 0], 2.0)
    assert torch.allclose(values, torch.zeros(3), atol=1e-6) and valid.tolist() == [1, 1, 0]
    t = torch.randn(5, 4)
    v1, _ = roi_kl_per_image(s, log_probs(t, 1.0), [5], 1.0)
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s, 1), torch.log_softmax(t, 1), reduction="none", log_target=True
    )
    assert torch.allclose(v1, kl.sum(1).mean().reshape(1))


def test_mean_log_probs_is_the_log_of_the_mean_distribution():
    a, b = torch.log_softmax(torch.randn(2, 3), 1), torch.log_softmax(torch.randn(2, 3), 1)
    assert torch.allclose(mean_log_probs([a, b]).exp(), (a.exp() + b.exp()) / 2, atol=1e-6)
    assert mean_log_probs([a]) is a


def test_box_term_reads_foreground_deltas_of_the_gt_class_only():
    sampled = _sampled([[0, 3], [3]])  # class 3 = background with 3 classes
    s_scores = torch.zeros(3, 4)
    s_deltas = torch.zeros(3, 12)
    t_deltas = torch.zeros(3, 12)
    t_deltas[0, 0:4] = 2.0  # proposal 0, class 0: counted
    t_deltas[1, :] = 5.0  # a background proposal: ignored
    values, valid = roi_box_per_image(s_scores, s_deltas, [t_deltas], sampled)
    assert values.tolist() == [2.0, 0.0] and valid.tolist() == [True, False]
    mean2, _ = roi_box_per_image(s_scores, s_deltas, [t_deltas, torch.zeros(3, 12)], sampled)
    assert mean2.tolist() == [1.0, 0.0]  # several targets are averaged


def test_rpn_terms_per_image():
    n, a = 2, 3
    s_obj, t_obj = [torch.zeros(n, a, 4, 4)], [torch.full((n, a, 4, 4), -10.0)]
    t_obj[0][1] = 10.0  # the teacher is confident about image 1 only
    s_dlt, t_dlt = [torch.zeros(n, a * 4, 4, 4)], [torch.ones(n, a * 4, 4, 4)]
    (obj, obj_valid), (dlt, dlt_valid) = rpn_per_image((s_obj, s_dlt), (t_obj, t_dlt), n, 4)
    assert obj_valid.all() and torch.allclose(obj[0], obj[1])
    assert dlt_valid.tolist() == [False, True] and dlt.tolist() == [0.0, 1.0]


def test_masked_mean_over_valid_images_never_nan():
    v = torch.tensor([1.0, 3.0, 100.0], requires_grad=True)
    assert masked_mean(v, torch.tensor([True, True, False])) == 2.0
    zero = masked_mean(v, torch.tensor([False, False, False]))
    assert zero == 0 and zero.requires_grad


def test_per_image_mean_matches_a_loop_and_marks_empty_images():
    """The device-side per-image mean equals the per-image loop it replaced; an image without
    proposals (or without foreground) gets 0, is invalid, and keeps a graph (DDP needs one)."""
    from kd_det.modeling.losses.roi import per_image_mean

    values = torch.rand(9, requires_grad=True)
    counts = [4, 0, 5]
    means, valid = per_image_mean(values, counts)
    expected = [values[:4].mean(), torch.tensor(0.0), values[4:].mean()]
    torch.testing.assert_close(means, torch.stack(expected).detach(), rtol=1e-6, atol=0)
    assert valid.tolist() == [True, False, True]
    fg = torch.tensor([1, 0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    means, valid = per_image_mean(values * fg, counts, fg)
    torch.testing.assert_close(means[0], (values[0] + values[3]).detach() / 2)
    assert valid.tolist() == [True, False, False] and means[2] == 0
    means.sum().backward()
    assert values.grad is not None


def test_foreground_maps_equal_box_by_box_painting():
    """The masks built by row x column products equal painting each box's covered cells (floor
    of the start, ceil of the end at the stride, clipped), boxes overlapping or outside."""
    from detectron2.structures import Boxes

    from kd_det.modeling.losses import foreground_maps

    gen = torch.Generator().manual_seed(0)
    instances = []
    for n in (5, 0, 3):
        inst = Instances((64, 80))
        xy = torch.rand(n, 2, generator=gen) * torch.tensor([90.0, 70.0]) - 5
        wh = torch.rand(n, 2, generator=gen) * 30
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.append(inst)
    for stride in (4, 8):
        h, w = 64 // stride, 80 // stride
        got = foreground_maps(instances, (h, w), stride, "cpu")
        want = torch.zeros(3, 1, h, w)
        for i, inst in enumerate(instances):
            for x0, y0, x1, y1 in inst.gt_boxes.tensor.tolist():
                a, b = max(0, min(w, int(x0 // stride))), max(0, min(h, int(y0 // stride)))
                c, d = -(-x1 // stride), -(-y1 // stride)
                c, d = max(0, min(w, int(c))), max(0, min(h, int(d)))
                want[i, 0, b:d, a:c] = 1.0
        assert torch.equal(got, want), stride
        assert got[1].sum() == 0 and got.sum() > 0
