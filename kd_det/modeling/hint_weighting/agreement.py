"""The meta objective of hint-dynamic weighting: agreement of each hint's gradient with the task.

Every hint's own gradient on the student tensor it reads, and the detection loss's gradient on
the same tensor, per image; their cosines, and the cosine of the weighted distillation gradient
with the task (:mod:`kd_det.modeling.hint_weighting` explains the objective).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["FP16_GRAD_SCALE", "HintInput", "agreement_cosine", "gradient_agreement", "hint_cosines"]

#: Both losses are multiplied by this before their gradients are taken when a student tensor is
#: float16 (fp16 autocast), and the gradients divided by it in float32 afterwards. Per-element
#: gradients of a mean over an FPN level are about 1e-8, below float16's smallest subnormal
#: (6e-8): unscaled they flush to zero and every cosine becomes 0. 2**16 is the initial scale of
#: ``GradScaler``, i.e. what the training step's own backward runs at.
FP16_GRAD_SCALE = 2.0**16

#: ``(student tensor, alias read by the hint, per-image row counts or None)``: what
#: ``DistillationRCNN`` records for each hint. ``None`` counts mean dim 0 is the image index.
HintInput = Tuple[torch.Tensor, torch.Tensor, Optional[Sequence[int]]]


def _per_image(x: torch.Tensor, num_images: int, counts: Optional[Sequence[int]]) -> torch.Tensor:
    """Sum a per-element quantity per image: over dims >= 1, then over each image's rows."""
    x = x.float()
    if x.dim() > 1:
        x = x.flatten(1).sum(dim=1)
    if counts is None:
        return x
    index = torch.repeat_interleave(
        torch.arange(num_images, device=x.device), torch.as_tensor(counts, device=x.device)
    )
    return x.new_zeros(num_images).index_add_(0, index, x)


def _unscaled(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """A gradient of a scaled loss, in float32, divided by the scale. A non-finite gradient (the
    scaled backward overflowed, as GradScaler would detect) counts as no gradient: zeros, so the
    hint has no say this step rather than a NaN cosine; checked on the device, without a sync."""
    grad = grad.float()
    if scale == 1.0:
        return grad
    return torch.nan_to_num(grad / scale, nan=0.0, posinf=0.0, neginf=0.0)


def gradient_agreement(
    terms: Dict[str, tuple],
    hint_inputs: Dict[str, List[HintInput]],
    detection_loss: torch.Tensor,
    hint_names: Sequence[str],
    num_images: int,
):
    """Per-image, per-hint inner products between hint and detection gradients.

    Two backward passes through the graph that the training step keeps anyway
    (``retain_graph=True``, nothing accumulated into ``.grad``): one of ``sum_k weight_k *
    sum_i(valid_ik * value_ik)`` w.r.t. the hints' aliases, giving each hint its own gradient on
    its own tensor, and one of the detection loss w.r.t. the same student tensors. Under float16
    both run on losses scaled by :data:`FP16_GRAD_SCALE`, as the training step's own backward
    runs under ``GradScaler``; the returned quantities are unscaled.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``dot, g2, d2``, each ``(N, K)`` float32 and detached:
        ``<g_ik, d_ik>``, ``|g_ik|^2`` and ``|d_ik|^2`` where ``d_ik`` is the detection gradient
        restricted to hint ``k``'s tensor and image ``i``.
    """
    k_total = len(hint_names)
    device = detection_loss.device
    dot = torch.zeros(num_images, k_total, device=device)
    g2, d2 = torch.zeros_like(dot), torch.zeros_like(dot)
    # A tensor without grad (e.g. res2 under detectron2's default BACKBONE.FREEZE_AT=2) cannot be
    # moved by its hint: zero gradient, so that hint has no say in the agreement.
    entries = [
        (k, orig, alias, counts)
        for k, name in enumerate(hint_names)
        for orig, alias, counts in hint_inputs.get(name, ())
        if alias.requires_grad and orig.requires_grad
    ]
    hint_total = sum(
        terms[name][2] * (terms[name][0] * terms[name][1].to(terms[name][0].dtype)).sum()
        for name in hint_names
        if name in terms
    )
    if not entries or not torch.is_tensor(hint_total) or not hint_total.requires_grad:
        return dot, g2, d2
    if not detection_loss.requires_grad:
        return dot, g2, d2
    half = any(torch.float16 in (orig.dtype, alias.dtype) for _, orig, alias, _ in entries)
    scale = FP16_GRAD_SCALE if half else 1.0
    g_all = torch.autograd.grad(
        hint_total * scale, [e[2] for e in entries], retain_graph=True, allow_unused=True
    )
    d_all = torch.autograd.grad(
        detection_loss * scale, [e[1] for e in entries], retain_graph=True, allow_unused=True
    )
    for (k, _, _, counts), g, d in zip(entries, g_all, d_all):
        if g is None:
            continue
        g = _unscaled(g, scale)
        g2[:, k] += _per_image(g * g, num_images, counts)
        if d is not None:
            d = _unscaled(d, scale)
            dot[:, k] += _per_image(g * d, num_images, counts)
            d2[:, k] += _per_image(d * d, num_images, counts)
    return dot, g2, d2


def hint_cosines(dot, g2, d2):
    """Per-image per-hint cosine ``c_ik`` between hint ``k``'s gradient and the detection gradient
    on hint ``k``'s tensor; 0 where either is zero (a hint without gradient, a tensor the task
    does not reach)."""
    ok = (g2 > 0) & (d2 > 0)
    # clamp before sqrt: a zero norm must not produce an infinite value or derivative.
    c = dot / (g2.clamp_min(1e-30).sqrt() * d2.clamp_min(1e-30).sqrt())
    return torch.where(ok, c, torch.zeros_like(c)), ok


def agreement_cosine(weights, dot, g2, d2):
    """``cos_i`` of the weighted, block-normalised distillation gradient with the block-normalised
    detection gradient (module docstring), and a mask of the images where it is defined.

    With unit blocks, ``sum_k w_ik g_ik`` has norm ``|w_i|`` (over hints with a gradient) and the
    task direction norm ``sqrt(#blocks the task reaches)``, so
    ``cos_i = sum_k w_ik c_ik / (|w_i| sqrt(m_i))``.
    """
    c, _ = hint_cosines(dot, g2, d2)
    has_g, has_d = (g2 > 0).to(weights.dtype), (d2 > 0).to(weights.dtype)
    w_norm2 = (weights * weights * has_g).sum(dim=1)
    m = has_d.sum(dim=1)
    defined = (w_norm2 > 0) & (m > 0)
    cos = (weights * c).sum(dim=1) / (w_norm2.clamp_min(1e-30).sqrt() * m.clamp_min(1).sqrt())
    return cos, defined
