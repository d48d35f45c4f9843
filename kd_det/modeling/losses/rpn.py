"""RPN-level knowledge terms: a teacher's objectness and deltas on the student's anchors."""

import torch
import torch.nn.functional as F

__all__ = ["rpn_per_image"]


def _identity(_name, _student, x, _counts=None):
    return x


def rpn_per_image(s_rpn, t_rpn, num_images, box_dim, alias=_identity):
    """Objectness BCE against the teacher's probabilities, and L1 on the deltas of anchors the
    teacher believes in (probability above 0.5), per image.

    Both models must use the same anchors (checked at build); a teacher level of another spatial
    size is resized with nearest neighbours.

    Args:
        s_rpn, t_rpn (tuple(list[Tensor], list[Tensor])): ``StandardRPNHead`` outputs
            (objectness logits, anchor deltas), one tensor per level.
        num_images (int): batch size ``N``.
        box_dim (int): deltas per anchor.
        alias (callable): ``alias(hint_name, student_tensor, x) -> x'``, the student tensors read
            by each hint (hint-dynamic weighting records them); identity by default.

    Returns:
        tuple: ``((objectness (N,), valid (N,)), (deltas (N,), valid (N,)))``; an image without
        confident teacher anchors has no valid delta term.
    """
    s_obj, s_dlt = s_rpn
    t_obj, t_dlt = t_rpn
    n = num_images
    obj_vals, dlt_num, fg_count = [], [], []
    for so, to, sd, td in zip(s_obj, t_obj, s_dlt, t_dlt):
        so, to = alias("loss_kd_rpn_objectness", so, so.float()), to.float()
        if to.shape[-2:] != so.shape[-2:]:
            to = F.interpolate(to, size=so.shape[-2:], mode="nearest")
            td = F.interpolate(td, size=sd.shape[-2:], mode="nearest")
        p = torch.sigmoid(to)
        bce = F.binary_cross_entropy_with_logits(so, p, reduction="none")
        obj_vals.append(bce.flatten(1))
        a = so.shape[1]
        sd = alias("loss_kd_rpn_deltas", sd, sd.float())
        sd = sd.view(n, a, box_dim, *sd.shape[-2:])
        td = td.float().view(n, a, box_dim, *td.shape[-2:])
        mask = (p > 0.5).unsqueeze(2).float()
        l1 = F.smooth_l1_loss(sd, td, beta=0.0, reduction="none") * mask
        dlt_num.append(l1.flatten(1).sum(1))
        fg_count.append(mask.flatten(1).sum(1))
    obj = torch.cat(obj_vals, dim=1).mean(1)
    num, cnt = torch.stack(dlt_num, 1).sum(1), torch.stack(fg_count, 1).sum(1)
    dlt = num / (cnt * box_dim).clamp(min=1.0)
    return (obj, torch.ones_like(obj, dtype=torch.bool)), (dlt, cnt > 0)
