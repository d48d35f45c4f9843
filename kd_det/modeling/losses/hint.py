"""One feature hint: a registered feature loss between a student map and a target map."""

import torch
import torch.nn.functional as F

__all__ = ["check_per_image", "feature_hint_per_image", "foreground_maps"]


def feature_hint_per_image(loss, student, target, adapter=None, weight_map=None):
    """``loss`` between ``student`` (through ``adapter`` when channels differ) and ``target``
    (resized bilinearly when its size differs), per image, in float32.

    Args:
        loss (nn.Module): a :data:`~kd_det.modeling.losses.FEATURE_LOSS_REGISTRY` loss.
        student (Tensor): ``(N, C_s, H, W)`` student map (gradients flow into it).
        target (Tensor): ``(N, C_t, h, w)`` teacher/peer map (detach it first if needed).
        adapter (nn.Module or None): maps ``C_s`` to ``C_t`` channels.
        weight_map (Tensor or None): ``(N, 1, H, W)`` per-pixel weights.

    Returns:
        tuple(Tensor, Tensor): ``(N,)`` values and an all-true ``(N,)`` validity.
    """
    s = student.float()
    if adapter is not None:
        s = adapter(s)
    t = target.float()
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    values = loss(s, t, weight_map=weight_map, per_image=True)
    check_per_image(loss, values, s)
    return values, torch.ones_like(values, dtype=torch.bool)


def check_per_image(loss, values, student):
    """Refuse a feature loss whose ``per_image=True`` output is not ``(N,)``.

    A user loss returning ``(N, C, H, W)`` would otherwise be averaged somewhere downstream into a
    number of another scale, silently. Checking a shape costs nothing (no device sync).

    Raises:
        ValueError: naming the loss, the shape it returned and the one it must return.
    """
    n = student.shape[0]
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (n,):
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(
            f"Feature loss {type(loss).__name__} (MODEL.KD.FEATURE.LOSS or "
            f"MODEL.ONLINE_KD.FEATURE_LOSS) returned {got} with per_image=True for maps of shape "
            f"{tuple(student.shape)}; it must return a tensor of shape ({n},), one value per "
            "image. Reduce the other dimensions in its forward, e.g. "
            "per = (student - teacher).abs().flatten(1).mean(1)."
        )


def foreground_maps(instances, shape, stride, device):
    """``(N, 1, H, W)`` maps that are 1 inside any ground-truth box (at feature ``stride``).

    Built on the device without reading the boxes back to the host (which would wait for the GPU
    once per image): each box is a row mask ``(B, H)`` times a column mask ``(B, W)``, and the
    product of the two over boxes counts the boxes covering each pixel (exact small integers).
    """
    n = len(instances)
    h, w = shape
    out = torch.zeros((n, 1, h, w), device=device)
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    for i, inst in enumerate(instances):
        boxes = inst.gt_boxes.tensor.to(device=device, dtype=torch.float32)
        if boxes.shape[0] == 0:
            continue
        x0 = (boxes[:, 0] / stride).floor().clamp(0, w)
        y0 = (boxes[:, 1] / stride).floor().clamp(0, h)
        x1 = (boxes[:, 2] / stride).ceil().clamp(0, w)
        y1 = (boxes[:, 3] / stride).ceil().clamp(0, h)
        in_rows = ((rows >= y0[:, None]) & (rows < y1[:, None])).float()  # (B, H)
        in_cols = ((cols >= x0[:, None]) & (cols < x1[:, None])).float()  # (B, W)
        out[i, 0] = (in_rows.t() @ in_cols).clamp_(max=1.0)
    return out
