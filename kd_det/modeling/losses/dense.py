"""Dense-head knowledge terms: a teacher's per-anchor class probabilities and boxes, taught on the
student's anchors (RetinaNet-style heads; the same anchors in both models, checked at build).

**Classification** (``loss_kd_dense_cls``, ``loss_kd_crosskd_cls``): quality-focal BCE of the
student's sigmoid probabilities against the teacher's, ``BCE(q, p) * |q - p| ** beta`` for every
anchor and class, normalized by the image's ground-truth foreground anchors as RetinaNet's own
focal loss is. **Boxes** (``loss_kd_dense_box``, ``loss_kd_crosskd_box``): L1 on deltas or GIoU on
decoded boxes, on anchors that the ground truth or the teacher makes foreground; an image without
such an anchor has no box term. See docs/distill_retinanet.md, "The knowledge terms", for why the
focal factor is needed and how foreground anchors are chosen.
"""

import torch
import torch.nn.functional as F
from fvcore.nn import giou_loss

__all__ = ["BOX_LOSSES", "dense_box_per_image", "dense_cls_per_image", "foreground_anchors"]

#: Values of ``MODEL.KD.DENSE.BOX_LOSS``.
BOX_LOSSES = ("l1", "giou")


def dense_cls_per_image(s_logits, t_logits, normalizer, beta):
    """Quality-focal BCE of the student's logits against the teacher's probabilities.

    Args:
        s_logits (Tensor): ``(N, R, K)`` student class logits on all ``R`` anchors.
        t_logits (Tensor): ``(N, R, K)`` teacher logits on the same anchors (no gradient).
        normalizer (Tensor): ``(N,)`` ground-truth foreground anchors per image.
        beta (float): exponent of the focal factor ``|q - p|``.

    Returns:
        tuple(Tensor, Tensor): ``(N,)`` float32 values and an all-true validity.
    """
    s = s_logits.float()
    p = torch.sigmoid(t_logits.float())
    loss = F.binary_cross_entropy_with_logits(s, p, reduction="none")
    if beta:
        loss = loss * (torch.sigmoid(s) - p).abs().pow(beta)
    values = loss.flatten(1).sum(1) / normalizer.float().clamp(min=1.0)
    return values, torch.ones_like(values, dtype=torch.bool)


def foreground_anchors(gt_labels, t_logits, num_classes, score_thresh):
    """``(N, R)`` anchors that the ground truth or the teacher makes foreground.

    Args:
        gt_labels (Tensor): ``(N, R)`` RetinaNet anchor labels (``-1`` ignore, ``num_classes``
            background).
        t_logits (Tensor): ``(N, R, K)`` teacher logits.
        score_thresh (float): the teacher's largest class probability above which an anchor is
            foreground; 1 or more: only the ground truth decides.
    """
    gt_fg = (gt_labels >= 0) & (gt_labels != num_classes)
    t_fg = torch.sigmoid(t_logits.float()).amax(dim=2) > score_thresh
    return gt_fg | t_fg


def dense_box_per_image(s_deltas, t_deltas, anchors, fg, s_transform, t_transform, loss="l1"):
    """Box KD on the foreground anchors ``fg``, per image.

    Args:
        s_deltas, t_deltas (Tensor): ``(N, R, 4)`` deltas of each model (in its own encoding).
        anchors (Tensor): ``(R, 4)`` the anchors (XYXY), shared by both models.
        fg (Tensor): ``(N, R)`` booleans (:func:`foreground_anchors`).
        s_transform, t_transform (Box2BoxTransform): each model's box encoding.
        loss (str): "l1" on the student's deltas, or "giou" on decoded boxes.

    Returns:
        tuple(Tensor, Tensor): ``(N,)`` float32 values, and validity (the image has foreground).
    """
    if loss not in BOX_LOSSES:
        raise ValueError(f"MODEL.KD.DENSE.BOX_LOSS={loss!r} is not one of {BOX_LOSSES}.")
    n = s_deltas.shape[0]
    s_deltas, t_deltas, anchors = s_deltas.float(), t_deltas.float(), anchors.float()
    values = []
    for i in range(n):
        idx = fg[i].nonzero().squeeze(1)
        a = anchors[idx]
        t_boxes = t_transform.apply_deltas(t_deltas[i, idx], a)
        if loss == "l1":
            target = t_deltas[i, idx]
            if tuple(s_transform.weights) != tuple(t_transform.weights):
                target = s_transform.get_deltas(a, t_boxes)
            per = F.l1_loss(s_deltas[i, idx], target, reduction="none").sum(1) / 4
        else:
            s_boxes = s_transform.apply_deltas(s_deltas[i, idx], a)
            per = giou_loss(s_boxes, t_boxes, reduction="none")
        # An empty selection sums to an attached zero (never the NaN of an empty mean).
        values.append(per.sum() / max(len(idx), 1))
    values = torch.stack(values)
    return values, fg.any(dim=1)
