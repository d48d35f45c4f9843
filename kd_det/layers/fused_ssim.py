"""Fused SSIM of a student map against a constant teacher map, in Triton (CUDA, or the interpreter).

Concepts: :func:`fused_ssim_sums` gives one number per image, ``sum w * (1 - SSIM)``, without ever
materializing the SSIM map: the range policy's affine map is applied on load (or, for ``minmax``,
the student's own range, ``own_range_eps``), and the backward recomputes the filtered statistics.
Work runs in chunks of planes whose float32 scratch fits in :data:`SCRATCH_BYTES`. It matches
:func:`kd_det.modeling.losses.ssim_functional.ssim_map`. Triton is optional: without it
:data:`HAS_TRITON` is False and :func:`fused_unavailable_reason` says why.
See docs/ssim_kernel.md for the derivation, the memory bound and the two jit modes.
"""

import os
from typing import Dict, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
except Exception:  # kd_det works without (or with a broken) triton: the reference SSIM is used
    triton = None

__all__ = [
    "HAS_TRITON",
    "SCRATCH_BYTES",
    "fused_ssim_map",
    "fused_ssim_sums",
    "fused_unavailable_reason",
    "interpreting",
]

HAS_TRITON = triton is not None
#: Upper bound of the float32 scratch of one launch chunk (filtered statistics + coefficients).
#: Why 256 MiB: it keeps the loss's extra memory well under 1 GB on FPN-sized batches, while the
#: chunks stay large enough (100+ planes of an 800x1216 P2) to fill a GPU.
SCRATCH_BYTES = 256 << 20
#: CUDA grids allow at most 65535 programs along the plane axis.
_MAX_CHUNK = 65535
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNELS: Dict[bool, dict] = {}
_compiler_disable = getattr(getattr(torch, "compiler", None), "disable", lambda fn: fn)


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is on now (read at every call, as Triton itself does)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def fused_unavailable_reason(device: torch.device) -> Optional[str]:
    """``None`` if the fused kernels can run on tensors of ``device``, else the reason why not."""
    if not HAS_TRITON:
        return "triton is not installed"
    if torch.device(device).type == "cuda" or interpreting():
        return None
    return (
        f"the fused SSIM kernels need CUDA tensors (got {torch.device(device).type}); on CPU they "
        "run only under the Triton interpreter (TRITON_INTERPRET=1, used by the tests)"
    )


def _kernels() -> dict:
    """The kernels, jitted once per mode (compiled or interpreted)."""
    mode = interpreting()
    if mode not in _KERNELS:
        from . import _fused_ssim_kernels as src

        # triton.jit reads TRITON_INTERPRET when it wraps a function; it is in effect right now.
        _KERNELS[mode] = {name: triton.jit(fn) for name, fn in src.KERNELS.items()}
    return _KERNELS[mode]


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tiling(rows: int, cols: int) -> Tuple[int, int, int, int, int]:
    """``(BH, BW, n_col_blocks, n_tiles, num_warps)`` for a ``rows x cols`` output per plane.

    The interpreter runs programs one after another, so it gets few large tiles; CUDA gets tiles of
    up to 16 x 64 (wide rows: the column shifts of the horizontal pass stay within cache lines)
    with 4 outputs per thread (44-80 registers on sm_90, see ``_fused_ssim_kernels``).
    """
    cap_h, cap_w = (64, 128) if interpreting() else (16, 64)
    bh, bw = min(cap_h, _pow2(rows)), min(cap_w, _pow2(cols))
    n_col_blocks = -(-cols // bw)
    num_warps = max(1, min(8, bh * bw // 128))
    return bh, bw, n_col_blocks, n_col_blocks * -(-rows // bh), num_warps


def _chunk(planes: int, bytes_per_plane: int) -> int:
    return max(1, min(planes, _MAX_CHUNK, SCRATCH_BYTES // max(1, bytes_per_plane)))


def _check(x, y, window, affine, weight):
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"x and y must share one (N, C, H, W) shape, got {x.shape}, {y.shape}.")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device, got {x.device} and {y.device}.")
    if x.dtype not in _SUPPORTED_DTYPES or y.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"Fused SSIM reads {_SUPPORTED_DTYPES}, got {x.dtype} and {y.dtype}.")
    k = window.numel()
    if window.dim() != 1 or k % 2 != 1:
        raise ValueError(
            f"window must be a 1-D odd-length tensor, got shape {tuple(window.shape)}."
        )
    if min(x.shape[-2:]) < k:
        raise ValueError(f"Map {tuple(x.shape)} is smaller than the {k}-pixel window.")
    n, c, h, w = x.shape
    for t in affine:
        if t.numel() != n * c:
            raise ValueError(f"Affine parameters must have N * C = {n * c} values, got {t.shape}.")
    if weight is not None and tuple(weight.shape) != (n, 1, h - k + 1, w - k + 1):
        raise ValueError(f"weight must be (N, 1, H-k+1, W-k+1), got {tuple(weight.shape)}.")


def _prepare(x, y, window, shift_x, inv_x, shift_y, inv_y):
    """Contiguous inputs, a float32 window, and float32 ``(N*C,)`` affine parameters."""
    n, c = x.shape[:2]
    x, y = x.contiguous(), y.detach().contiguous()
    window = window.detach().to(device=x.device, dtype=torch.float32).contiguous()

    def param(t, fill):
        if t is None:
            return torch.full((n * c,), fill, device=x.device, dtype=torch.float32)
        return t.detach().to(device=x.device, dtype=torch.float32).reshape(n * c).contiguous()

    affine = (param(shift_x, 0.0), param(inv_x, 1.0), param(shift_y, 0.0), param(inv_y, 1.0))
    return x, y, window, affine


def _run_forward(x, y, window, affine, weight, c1, c2, mode):
    """Launch the forward passes chunk by chunk; ``mode`` 0 returns ``(N,)`` sums, 2 the map."""
    kern = _kernels()
    n, c, h, w = x.shape
    k = window.numel()
    hv, wv = h - k + 1, w - k + 1
    planes = n * c
    bh_v, bw_v, ncb_v, tiles_v, warps_v = _tiling(hv, w)
    bh_s, bw_s, ncb_s, tiles_s, warps_s = _tiling(hv, wv)
    chunk = _chunk(planes, 5 * hv * w * 4)
    stats = torch.empty(5 * chunk * hv * w, device=x.device, dtype=torch.float32)
    if mode == 0:
        out = torch.empty((planes, tiles_s), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((n, c, hv, wv), device=x.device, dtype=torch.float32)
    if weight is None:
        w_arg, w_strides = window, (0, 0, 0)
    else:
        w_arg, w_strides = weight, (weight.stride(0), weight.stride(2), weight.stride(3))
    for plane0 in range(0, planes, chunk):
        p = min(chunk, planes - plane0)
        kern["vertical_stats"][(tiles_v, p)](
            x, y, *affine, window, stats, plane0, p, h, w, hv, ncb_v,
            K=k, BH=bh_v, BW=bw_v, num_warps=warps_v,
        )  # fmt: skip
        kern["ssim_rows"][(tiles_s, p)](
            stats, window, w_arg, *w_strides, window, out, plane0, p, c, hv, w, wv, ncb_s,
            tiles_s, float(c1), float(c2),
            K=k, BH=bh_s, BW=bw_s, HAS_WEIGHT=weight is not None, MODE=mode, num_warps=warps_s,
        )  # fmt: skip
    if mode == 2:
        return out
    # Per-tile partials are summed in float64: cheap, and the order no longer matters.
    return out.view(n, c * tiles_s).sum(dim=1, dtype=torch.float64).float()


def _run_backward(x, y, window, affine, weight, c1, c2, grad, own_range):
    """Gradient of ``sum_n grad[n] * sums[n]`` with respect to ``x``, chunk by chunk.

    ``own_range``: ``None``, or ``(lo, hi, eps)`` when ``x`` was normalized by its own per-image
    range; the shift and scale then depend on ``x``, and their gradient is added
    (docs/ssim_kernel.md).
    """
    kern = _kernels()
    n, c, h, w = x.shape
    k = window.numel()
    hv, wv = h - k + 1, w - k + 1
    planes = n * c
    bh_v, bw_v, ncb_v, tiles_v, warps_v = _tiling(hv, w)
    bh_s, bw_s, ncb_s, tiles_s, warps_s = _tiling(hv, wv)
    bh_g, bw_g, ncb_g, tiles_g, warps_g = _tiling(h, w)
    chunk = _chunk(planes, (5 * hv * w + 3 * hv * wv) * 4)
    stats = torch.empty(5 * chunk * hv * w, device=x.device, dtype=torch.float32)
    coef = torch.empty(3 * chunk * hv * wv, device=x.device, dtype=torch.float32)
    grad_x = torch.empty_like(x)
    if own_range is None:
        sum_g = sum_gs = window  # unused
    else:
        sum_g = torch.empty((2, planes, tiles_g), device=x.device, dtype=torch.float32)
        sum_g, sum_gs = sum_g.unbind(0)
    if weight is None:
        w_arg, w_strides = window, (0, 0, 0)
    else:
        w_arg, w_strides = weight, (weight.stride(0), weight.stride(2), weight.stride(3))
    for plane0 in range(0, planes, chunk):
        p = min(chunk, planes - plane0)
        kern["vertical_stats"][(tiles_v, p)](
            x, y, *affine, window, stats, plane0, p, h, w, hv, ncb_v,
            K=k, BH=bh_v, BW=bw_v, num_warps=warps_v,
        )  # fmt: skip
        kern["ssim_rows"][(tiles_s, p)](
            stats, window, w_arg, *w_strides, grad, coef, plane0, p, c, hv, w, wv, ncb_s,
            tiles_s, float(c1), float(c2),
            K=k, BH=bh_s, BW=bw_s, HAS_WEIGHT=weight is not None, MODE=1, num_warps=warps_s,
        )  # fmt: skip
        kern["adjoint_rows"][(tiles_v, p)](
            coef, window, stats, p, hv, w, wv, ncb_v, K=k, BH=bh_v, BW=bw_v, num_warps=warps_v
        )
        kern["adjoint_cols_grad"][(tiles_g, p)](
            stats, window, x, y, *affine, grad_x, sum_g, sum_gs, plane0, p, h, w, hv, ncb_g,
            tiles_g, K=k, BH=bh_g, BW=bw_g, RANGE_SUMS=own_range is not None, num_warps=warps_g,
        )  # fmt: skip
    if own_range is not None:
        _add_range_gradient(x, grad_x, own_range, sum_g, sum_gs, affine[1])
    return grad_x


def _add_range_gradient(x, grad_x, own_range, sum_g, sum_gs, inv_x):
    """Add the gradient through ``s = (x - lo) / max(hi - lo, eps)``, ``x``'s own ``lo`` and ``hi``.

    With ``S1 = sum dL/ds`` and ``S2 = sum s dL/ds`` over the image and ``m = [hi - lo >= eps]``:
    ``dL/dlo = -inv (S1 - m S2)``, ``dL/dhi = -inv m S2``; each is spread evenly over the pixels
    that equal the minimum (maximum), as the backward of ``amin``/``amax`` does.
    """
    n, c, h, w = x.shape
    lo, hi, eps = own_range
    s1 = sum_g.reshape(n, -1).sum(dim=1, dtype=torch.float64)
    s2 = sum_gs.reshape(n, -1).sum(dim=1, dtype=torch.float64)
    inv = inv_x.view(n, c)[:, 0].double()
    m = (hi - lo >= eps).double()
    d_lo = -inv * (s1 - m * s2)
    d_hi = -inv * m * s2
    flat = x.view(n, -1)
    ties_lo = (flat == lo.to(x.dtype).view(n, 1)).sum(dim=1)
    ties_hi = (flat == hi.to(x.dtype).view(n, 1)).sum(dim=1)
    add_lo = (d_lo / ties_lo).float().contiguous()
    add_hi = (d_hi / ties_hi).float().contiguous()
    bh, bw, ncb, tiles, warps = _tiling(h, w)
    for plane0 in range(0, n * c, _MAX_CHUNK):
        p = min(_MAX_CHUNK, n * c - plane0)
        _kernels()["range_ties"][(tiles, p)](
            x, grad_x, lo, hi, add_lo, add_hi, plane0, c, h, w, ncb, BH=bh, BW=bw, num_warps=warps
        )


class _FusedSSIMSums(torch.autograd.Function):
    """``(N,)`` sums of ``w * (1 - SSIM)``; saves only the inputs and per-plane parameters."""

    @staticmethod
    def forward(ctx, x, y, window, shift_x, inv_x, shift_y, inv_y, weight, c1, c2, lo, hi, eps):
        affine = (shift_x, inv_x, shift_y, inv_y)
        sums = _run_forward(x, y, window, affine, weight, c1, c2, mode=0)
        ctx.save_for_backward(x, y, window, shift_x, inv_x, shift_y, inv_y, weight, lo, hi)
        ctx.constants = (c1, c2, eps)
        return sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, window, shift_x, inv_x, shift_y, inv_y, weight, lo, hi = ctx.saved_tensors
        c1, c2, eps = ctx.constants
        grad = grad.detach().to(dtype=torch.float32).contiguous()
        affine = (shift_x, inv_x, shift_y, inv_y)
        own_range = None if lo is None else (lo, hi, eps)
        grad_x = _run_backward(x, y, window, affine, weight, c1, c2, grad, own_range)
        return (grad_x,) + (None,) * 12


@_compiler_disable
def fused_ssim_sums(
    x: torch.Tensor,
    y: torch.Tensor,
    window: torch.Tensor,
    c1: float,
    c2: float,
    shift_x: Optional[torch.Tensor] = None,
    inv_x: Optional[torch.Tensor] = None,
    shift_y: Optional[torch.Tensor] = None,
    inv_y: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    own_range_eps: Optional[float] = None,
) -> torch.Tensor:
    """Per-image ``sum over (c, i, j) of weight[n, 0, i, j] * (1 - SSIM[n, c, i, j])``.

    SSIM is taken between ``s = (x - shift_x) * inv_x`` and ``t = (y - shift_y) * inv_y`` (one
    affine map per ``(n, c)``, identity when omitted), over the valid region of the separable
    Gaussian ``window``. Gradients flow to ``x`` only; ``y``, the parameters and the weights are
    constants. Kept out of ``torch.compile`` graphs (the Triton launches run eagerly).

    With ``own_range_eps``, ``x`` is instead normalized by its own range over each image,
    ``s = (x - min) / max(max - min, own_range_eps)`` (the ``minmax`` range policy), and the
    gradient includes the dependence of ``min`` and ``max`` on ``x``, without materializing ``s``.

    Args:
        x (Tensor): ``(N, C, H, W)`` student map, float32, float16 or bfloat16, CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        y (Tensor): teacher map, same shape and device (any of those dtypes).
        window (Tensor): 1-D normalized Gaussian of odd length ``k <= min(H, W)``.
        c1, c2 (float): SSIM constants ``(K1 R)^2`` and ``(K2 R)^2``.
        shift_x, inv_x, shift_y, inv_y (Tensor or None): ``N * C`` values each (any shape).
        weight (Tensor or None): ``(N, 1, H - k + 1, W - k + 1)`` weights at the SSIM pixels
            (a cropped view is fine), or ``None`` for all ones.
        own_range_eps (float or None): see above; excludes ``shift_x`` and ``inv_x``.

    Returns:
        Tensor: ``(N,)`` float32.
    """
    reason = fused_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    _check(x, y, window, [t for t in (shift_x, inv_x, shift_y, inv_y) if t is not None], weight)
    lo = hi = None
    if own_range_eps is not None:
        if shift_x is not None or inv_x is not None:
            raise ValueError("own_range_eps replaces shift_x and inv_x; pass one or the other.")
        n, c = x.shape[:2]
        with torch.no_grad():
            lo, hi = torch.aminmax(x.detach().reshape(n, -1), dim=1)
            lo, hi = lo.float(), hi.float()
            shift_x = lo.repeat_interleave(c)
            inv_x = (hi - lo).clamp_min(own_range_eps).reciprocal().repeat_interleave(c)
    x, y, window, affine = _prepare(x, y, window, shift_x, inv_x, shift_y, inv_y)
    if weight is not None:
        weight = weight.detach()
        if weight.dtype not in _SUPPORTED_DTYPES:
            weight = weight.float()
    return _FusedSSIMSums.apply(
        x, y, window, *affine, weight, float(c1), float(c2), lo, hi, own_range_eps
    )


@_compiler_disable
def fused_ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window: torch.Tensor,
    c1: float,
    c2: float,
    shift_x: Optional[torch.Tensor] = None,
    inv_x: Optional[torch.Tensor] = None,
    shift_y: Optional[torch.Tensor] = None,
    inv_y: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The ``(N, C, H - k + 1, W - k + 1)`` float32 SSIM map, without gradient.

    For checks and inspection: the loss itself uses :func:`fused_ssim_sums`, which never
    materializes the map. Arguments as there.
    """
    reason = fused_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)
    _check(x, y, window, [t for t in (shift_x, inv_x, shift_y, inv_y) if t is not None], None)
    x, y, window, affine = _prepare(x.detach(), y, window, shift_x, inv_x, shift_y, inv_y)
    return _run_forward(x, y, window, affine, None, c1, c2, mode=2)
