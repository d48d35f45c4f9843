"""Separable Gaussian "valid" filter of SSIM as band-matrix products, and its adjoint.

Concepts: a 1-D valid filter along one axis is a product with a band matrix ``M[i, i + j] =
win[j]`` (dense BLAS instead of a depthwise convolution, which is slow on CPU); long axes are
filtered in tiles; the adjoint (for hand-written backwards) is the transposed product; every
product runs at full float32 precision whatever the TF32 setting (:func:`full_fp32_matmul`),
because SSIM's ``E[x^2] - mu^2`` cancels. The window is ``pytorch_msssim``'s, so values match it.
Used by the reference SSIM of :mod:`kd_det.modeling.losses.ssim`.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d

__all__ = ["full_fp32_matmul", "gaussian_valid", "gaussian_valid_adjoint", "gaussian_window"]

# Longest run of filter outputs computed by one dense band matrix; longer runs are split into tiles
# of about _BAND_TILE outputs (see _filter_dim).
_BAND_MAX = 256
_BAND_TILE = 128


def gaussian_window(win_size: int, win_sigma: float, device=None, dtype=None) -> torch.Tensor:
    """1-D normalized Gaussian ``(win_size,)``: pytorch_msssim's kernel, so values match."""
    win = _fspecial_gauss_1d(win_size, win_sigma).reshape(win_size)
    return win.to(device=device, dtype=dtype or torch.float32)


@functools.lru_cache(maxsize=128)
def _band_matrix(n_out: int, win_size: int, win_sigma: float, device, dtype) -> torch.Tensor:
    """``(n_out, n_out + k - 1)`` matrix ``M[i, i + j] = win[j]``: ``M @ v`` is the valid filter."""
    win = gaussian_window(win_size, win_sigma, device, dtype)
    band = torch.zeros(n_out, n_out + win_size - 1, device=device, dtype=dtype)
    rows = torch.arange(n_out, device=device)
    for j in range(win_size):
        band[rows, rows + j] = win[j]
    return band


def _filter_dim(x: torch.Tensor, dim: int, win_size: int, win_sigma: float, adjoint: bool = False):
    """Valid Gaussian filter along ``dim`` (-1 or -2) of ``x``, or its adjoint (for backward).

    Why matrix products instead of ``F.conv2d(groups=C)``: the depthwise convolution is slow on
    CPU, and a dense band matrix (``length / k`` times more FLOPs, but BLAS) is faster for FPN-sized
    maps; for very long maps the dense band loses, so runs longer than ``_BAND_MAX`` outputs are
    split into tiles of about ``_BAND_TILE``. The timings behind both numbers are in the README
    (``python dev/benchmark_ssim.py``).
    Tiled outputs are concatenated, and the tiled adjoint is written as a valid filter of the
    zero-padded gradient (the Gaussian is symmetric, so no flip is needed).
    """
    k = win_size
    length = x.shape[dim]
    if adjoint:
        if length > _BAND_MAX:
            pad = (k - 1, k - 1) if dim == -1 else (0, 0, k - 1, k - 1)
            return _filter_dim(F.pad(x, pad), dim, win_size, win_sigma)
        band = _band_matrix(length, win_size, win_sigma, x.device, x.dtype)
        return torch.matmul(x, band) if dim == -1 else torch.matmul(band.t(), x)
    n_out = length - k + 1
    n_tiles = 1 if n_out <= _BAND_MAX else -(-n_out // _BAND_TILE)
    size = -(-n_out // n_tiles)
    outs = []
    for start in range(0, n_out, size):
        t = min(size, n_out - start)
        band = _band_matrix(t, win_size, win_sigma, x.device, x.dtype)
        part = x.narrow(dim, start, t + k - 1)
        outs.append(torch.matmul(part, band.t()) if dim == -1 else torch.matmul(band, part))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=dim)


@contextlib.contextmanager
def full_fp32_matmul():
    """Float32 matrix products at full precision inside (no TF32, no bf16); restored on exit.

    Why: SSIM subtracts filtered second moments, ``E[x^2] - mu^2``, which cancel; with TF32
    matrix products (``torch.backends.cuda.matmul.allow_tf32`` or
    ``torch.set_float32_matmul_precision("high")``) the band-matrix filters keep 10 mantissa bits
    and the loss came out 1.3 % off on an H200. The setting is saved and restored with the API the
    running torch has (per-backend ``fp32_precision`` since torch 2.9, which must not be mixed with
    the legacy flags, or the legacy global setting before).
    """
    cuda_mm = torch.backends.cuda.matmul
    mkldnn_mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if hasattr(mkldnn_mm, "fp32_precision") and hasattr(cuda_mm, "fp32_precision"):
        old = (cuda_mm.fp32_precision, mkldnn_mm.fp32_precision)
        cuda_mm.fp32_precision = mkldnn_mm.fp32_precision = "ieee"
        try:
            yield
        finally:
            cuda_mm.fp32_precision, mkldnn_mm.fp32_precision = old
    else:  # older torch: one global setting plus the cuBLAS TF32 flag
        old = (torch.get_float32_matmul_precision(), cuda_mm.allow_tf32)
        torch.set_float32_matmul_precision("highest")
        cuda_mm.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old[0])
            cuda_mm.allow_tf32 = old[1]


def gaussian_valid(x: torch.Tensor, win_size: int, win_sigma: float) -> torch.Tensor:
    """Separable Gaussian "valid" filter over ``H`` then ``W`` (pytorch_msssim's order), with
    full-precision float32 matrix products whatever the TF32 setting (:func:`full_fp32_matmul`)."""
    with full_fp32_matmul():
        return _filter_dim(_filter_dim(x, -2, win_size, win_sigma), -1, win_size, win_sigma)


def gaussian_valid_adjoint(g: torch.Tensor, win_size: int, win_sigma: float) -> torch.Tensor:
    """Adjoint of :func:`gaussian_valid`: maps a valid-size gradient back to input size."""
    with full_fp32_matmul():
        g = _filter_dim(g, -1, win_size, win_sigma, adjoint=True)
        return _filter_dim(g, -2, win_size, win_sigma, adjoint=True)
