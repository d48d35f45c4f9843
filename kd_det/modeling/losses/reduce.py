"""Reductions shared by the feature losses: per-pixel loss maps to per-image or batch values.

Every kd_det distillation term is computed per image and reduced over the valid images by the
meta-architecture, so the feature losses return ``(N,)`` values when asked (``per_image=True``).
"""

from typing import Optional

import torch

__all__ = ["attached_zero", "check_pair", "masked_mean", "reduce_loss_map"]


def attached_zero(student: torch.Tensor, per_image: bool) -> torch.Tensor:
    """A zero loss that still depends on ``student``.

    Returning a detached zero for a skipped level would leave the parameters that produce that
    level without gradients, which breaks DDP (``find_unused_parameters=False``). ``nan_to_num``
    keeps it zero (not NaN) even if the student holds non-finite values.

    Args:
        student (Tensor): ``(N, ...)`` map the loss would have been computed from.
        per_image (bool): return ``(N,)`` zeros instead of a scalar.

    Returns:
        Tensor: float32 zero(s) with a graph to ``student``.
    """
    zero = torch.nan_to_num(student.float(), nan=0.0, posinf=0.0, neginf=0.0).mul(0.0)
    zero = zero.flatten(1).sum(dim=1)
    return zero if per_image else zero.sum()


def reduce_loss_map(
    loss_map: torch.Tensor, weight_map: Optional[torch.Tensor], per_image: bool
) -> torch.Tensor:
    """Mean of ``loss_map`` (N, C, h, w), optionally weighted by ``weight_map`` (N, 1, h, w).

    Weighted, the batch value is ``sum(w * l) / (C * sum(w))`` over the whole batch, so every
    weighted pixel counts the same wherever it is; per image the same ratio is taken per image, and
    the batch value is the per-image values averaged with weights ``sum(w_n)``. A zero total weight
    gives 0 (not 0/0), so an image without foreground cannot turn the loss into NaN.

    Args:
        loss_map (Tensor): per-pixel, per-channel loss values.
        weight_map (Tensor or None): non-negative per-pixel weights, shared by all channels;
            detached (weights are not learned through the loss).
        per_image (bool): return ``(N,)`` values instead of the batch scalar.

    Returns:
        Tensor: scalar, or ``(N,)`` with ``per_image``.
    """
    if weight_map is None:
        per = loss_map.flatten(1).mean(dim=1)
        return per if per_image else per.mean()
    w = weight_map.float().detach()
    num = (loss_map * w).flatten(1).sum(dim=1)
    den = w.flatten(1).sum(dim=1) * loss_map.shape[1]
    if per_image:
        return num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return num.sum() / den.sum().clamp_min(torch.finfo(den.dtype).tiny)


def check_pair(student: torch.Tensor, teacher: torch.Tensor, weight_map: Optional[torch.Tensor]):
    """Raise ``ValueError`` unless the maps share one ``(N, C, H, W)`` shape and ``weight_map`` is
    ``(N, 1, H, W)``.

    The meta-architectures adapt channels and resize before calling a loss, so a mismatch here is
    a bug in the caller; naming both shapes makes it quick to find.
    """
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"Expected student and teacher maps of the same (N, C, H, W) shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}."
        )
    if weight_map is not None:
        n, _, h, w = student.shape
        if tuple(weight_map.shape) != (n, 1, h, w):
            raise ValueError(
                f"weight_map must have shape {(n, 1, h, w)}, got {tuple(weight_map.shape)}."
            )


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of per-image ``values`` over the ``valid`` images; an attached zero when none is valid
    (never NaN: an image without foreground proposals has no box term, a batch may have none).

    Args:
        values (Tensor): ``(N,)`` per-image values of one term.
        valid (Tensor): ``(N,)`` booleans.

    Returns:
        Tensor: scalar.
    """
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)
