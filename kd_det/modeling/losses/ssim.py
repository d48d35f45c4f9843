"""SSIM feature loss (SSIM-KD) with a band-matrix Gaussian filter and a hand-written backward.

The SSIM map is computed with a separable Gaussian "valid" convolution (no padding), like
``pytorch_msssim``; its mean equals ``pytorch_msssim.ssim`` and
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``, whose reflect-padded full map cropped by the window radius is the
same valid region (both tested). Maps smaller than the window are handled explicitly
(``small_map``) instead of ``pytorch_msssim``'s silent "Skipping Gaussian Smoothing". Both maps go
through a range policy first (:mod:`kd_det.modeling.losses.normalize`), because SSIM on signed
activations mistakes a sign-flipped student for a similar one.
"""

import functools
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d
from torch import nn
from torch.autograd.function import once_differentiable

from .normalize import DEFAULT_SSIM_POLICY, POLICY_DATA_RANGE, RANGE_POLICIES, normalize_pair
from .reduce import attached_zero, check_pair, reduce_loss_map
from .registry import FEATURE_LOSS_REGISTRY

logger = logging.getLogger(__name__)

__all__ = [
    "LOSS_FORMS",
    "SMALL_MAP_RULES",
    "SSIMFeatureLoss",
    "gaussian_valid",
    "gaussian_window",
    "ssim_map",
]

LOSS_FORMS = ("1-ssim", "(1-ssim)/2")
SMALL_MAP_RULES = ("shrink", "skip")

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
    (``python tools/benchmark_ssim.py``).
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


def gaussian_valid(x: torch.Tensor, win_size: int, win_sigma: float) -> torch.Tensor:
    """Separable Gaussian "valid" filter over ``H`` then ``W`` (pytorch_msssim's order)."""
    return _filter_dim(_filter_dim(x, -2, win_size, win_sigma), -1, win_size, win_sigma)


def _gaussian_valid_adjoint(g: torch.Tensor, win_size: int, win_sigma: float) -> torch.Tensor:
    """Adjoint of :func:`gaussian_valid`: maps a valid-size gradient back to input size."""
    g = _filter_dim(g, -1, win_size, win_sigma, adjoint=True)
    return _filter_dim(g, -2, win_size, win_sigma, adjoint=True)


class _SSIMMap(torch.autograd.Function):
    """SSIM map of a student ``x`` against a constant teacher ``y``, with a hand-written backward.

    Why a custom Function: with autograd, the elementwise SSIM formula records ~25 full-size
    intermediate tensors and its backward replays about as many elementwise kernels; those
    dominated once the filters became matrix products. Here the forward also computes the three
    partial derivatives of the SSIM map with respect to the filtered student statistics
    ``(mu_x, E[x^2], E[xy])`` and saves only them; the backward is then three multiplications by
    the incoming gradient, one adjoint filter of a 3C-channel stack and ``b1 + 2 x b2 + y b3``.

    With ``L = A1 / B1`` (luminance), ``S = A2 / B2`` (contrast-structure), ``A1 = 2 mx my + C1``,
    ``B1 = mx^2 + my^2 + C1``, ``A2 = 2 (exy - mx my) + C2``, ``B2 = vx + vy + C2`` and
    ``vx = max(exx - mx^2, 0)`` (``m = [exx - mx^2 >= 0]``), SSIM = ``L S`` and::

        d SSIM / d exy = 2 L / B2
        d SSIM / d exx = -L S m / B2
        d SSIM / d mx  = 2 S (my - mx L) / B1 - my (d/d exy) - 2 mx (d/d exx)
    """

    @staticmethod
    def forward(ctx, x, y, win_size, win_sigma, c1, c2):
        n, c, h, w = x.shape
        stack = x.new_empty((n, 5 * c, h, w))
        stack[:, :c].copy_(x)
        stack[:, c : 2 * c].copy_(y)
        torch.mul(x, x, out=stack[:, 2 * c : 3 * c])
        torch.mul(y, y, out=stack[:, 3 * c : 4 * c])
        torch.mul(x, y, out=stack[:, 4 * c :])
        mu_x, mu_y, e_xx, e_yy, e_xy = gaussian_valid(stack, win_size, win_sigma).split(c, 1)
        del stack
        mu_xy = mu_x * mu_y
        mu_xx = mu_x * mu_x
        var_x = e_xx - mu_xx
        var_x_active = var_x >= 0
        # Rounding can push E[x^2] - mu^2 below zero in flat regions of large-valued maps, and
        # B2 could then reach 0 (NaN); clamping changes nothing elsewhere.
        var_x.clamp_(min=0.0)
        var_y = e_yy.sub_(mu_y * mu_y).clamp_(min=0.0)
        b1 = mu_xx.addcmul_(mu_y, mu_y).add_(c1)
        b2 = var_x.add_(var_y).add_(c2)
        lum = mu_xy.mul(2.0).add_(c1).div_(b1)
        cs = e_xy.sub_(mu_xy).mul_(2.0).add_(c2).div_(b2)
        ssim = lum * cs
        if ctx.needs_input_grad[0]:
            coef = x.new_empty((n, 3, c) + ssim.shape[-2:])
            d_mu, d_exx, d_exy = coef.unbind(1)
            torch.div(lum, b2, out=d_exy).mul_(2.0)
            torch.div(ssim, b2, out=d_exx).mul_(var_x_active).neg_()
            torch.mul(mu_x, lum, out=d_mu).neg_().add_(mu_y).mul_(cs).div_(b1).mul_(2.0)
            d_mu.addcmul_(mu_y, d_exy, value=-1.0).addcmul_(mu_x, d_exx, value=-2.0)
            ctx.save_for_backward(x, y, coef)
            ctx.window = (win_size, win_sigma)
        return ssim

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, coef = ctx.saved_tensors
        n, c = x.shape[:2]
        # backward() may be called inside an autocast region; keep the adjoint filter in float32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            g = (coef * grad.to(coef.dtype).unsqueeze(1)).view(n, 3 * c, *grad.shape[-2:])
            d_mu, d_exx, d_exy = _gaussian_valid_adjoint(g, *ctx.window).split(c, 1)
            grad_x = torch.addcmul(d_mu, x, d_exx, value=2.0).addcmul_(y, d_exy)
        return grad_x, None, None, None, None, None


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    win_size: int = 11,
    win_sigma: float = 1.5,
    K: Sequence[float] = (0.01, 0.03),
) -> torch.Tensor:
    """Per-pixel SSIM of ``x`` against a constant reference ``y`` (the teacher), valid region.

    Why not ``pytorch_msssim.ssim``: it only returns means, and the weighted (foreground) loss needs
    the map. The values equal pytorch_msssim's map (same kernel, same valid filtering, same filter
    order) to float rounding, and the hand-written backward of :class:`_SSIMMap` makes it faster
    (README, ``tools/benchmark_ssim.py``).

    Args:
        x (Tensor): ``(N, C, H, W)`` student map (gradients flow to it), float32 or float64.
        y (Tensor): teacher map of the same shape and dtype; treated as a constant.
        data_range (float): value range that sets ``C1 = (K1 R)^2``, ``C2 = (K2 R)^2``.
        win_size (int): odd window, ``<= min(H, W)``.
        win_sigma (float): Gaussian sigma.
        K (sequence): ``(K1, K2)``.

    Returns:
        Tensor: ``(N, C, H - k + 1, W - k + 1)``; pixel ``(i, j)`` is the SSIM of the window
        centred at ``(i + k // 2, j + k // 2)`` of the inputs.
    """
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"Map {tuple(x.shape)} is smaller than the {win_size}-pixel window.")
    if x.dtype != y.dtype or not x.is_floating_point():
        raise ValueError(f"x and y must share a floating dtype, got {x.dtype} and {y.dtype}.")
    c1 = (K[0] * data_range) ** 2
    c2 = (K[1] * data_range) ** 2
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _SSIMMap.apply(x, y.detach(), int(win_size), float(win_sigma), c1, c2)


class SSIMFeatureLoss(nn.Module):
    """SSIM-KD feature loss ``mean(1 - SSIM(student, teacher))`` for one feature level.

    Always computed in float32 with autocast disabled: the SSIM ratios of ``E[x^2] - mu^2`` lose
    all precision in fp16/bf16. The teacher is detached.
    """

    def __init__(
        self,
        win_size: int = 11,
        win_sigma: float = 1.5,
        K: Sequence[float] = (0.01, 0.03),
        data_range: Optional[float] = None,
        range_policy: str = DEFAULT_SSIM_POLICY,
        loss_form: str = "1-ssim",
        small_map: str = "shrink",
        eps: float = 1e-3,
    ):
        """
        Args:
            win_size (int): odd Gaussian window size (11 in the SSIM paper).
            win_sigma (float): Gaussian sigma; kept when the window is shrunk.
            K (sequence): SSIM constants ``(K1, K2)``.
            data_range (float or None): ``None`` takes the policy's range (1 for the min/max
                policies, 6 for ``standardize``); required for ``range_policy="none"``.
            range_policy (str): see :func:`normalize_pair`; default ``"teacher_absmax"`` is the
                one policy whose sign-flipped student is the worst case on every map type tried
                (README, "SSIM on feature maps").
            loss_form (str): ``"1-ssim"`` (in ``[0, 2]``) or ``"(1-ssim)/2"`` (in ``[0, 1]``).
            small_map (str): maps with ``min(H, W) < win_size``: ``"shrink"`` uses the largest
                odd window ``<= min(H, W)`` (levels under 3 pixels are skipped), ``"skip"`` skips
                them. A skipped level returns an attached zero and logs one warning per shape.
            eps (float): floor of the teacher scale, see :func:`normalize_pair`.
        """
        super().__init__()
        if win_size < 3 or win_size % 2 != 1:
            raise ValueError(f"win_size must be odd and >= 3, got {win_size}.")
        if range_policy not in RANGE_POLICIES:
            raise ValueError(f"Unknown range_policy {range_policy!r}; expected {RANGE_POLICIES}.")
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"Unknown loss_form {loss_form!r}; expected one of {LOSS_FORMS}.")
        if small_map not in SMALL_MAP_RULES:
            raise ValueError(f"Unknown small_map {small_map!r}; expected {SMALL_MAP_RULES}.")
        if data_range is None:
            data_range = POLICY_DATA_RANGE[range_policy]
            if data_range is None:
                raise ValueError('range_policy="none" needs an explicit data_range.')
        if data_range <= 0:
            raise ValueError(f"data_range must be positive, got {data_range}.")
        self.win_size = int(win_size)
        self.win_sigma = float(win_sigma)
        self.K = (float(K[0]), float(K[1]))
        self.data_range = float(data_range)
        self.range_policy = range_policy
        self.loss_form = loss_form
        self.small_map = small_map
        self.eps = float(eps)
        self._warned = set()

    @classmethod
    def from_config(cls, cfg):
        """Constructor arguments from ``MODEL.KD.SSIM.*`` and ``MODEL.KD.FEATURE.RANGE_POLICY``."""
        kd = cfg.MODEL.KD
        kwargs = dict(
            win_size=kd.SSIM.WINDOW_SIZE,
            win_sigma=kd.SSIM.SIGMA,
            K=tuple(kd.SSIM.K),
            data_range=kd.SSIM.DATA_RANGE or None,
            loss_form=kd.SSIM.LOSS_FORM,
            small_map=kd.SSIM.SMALL_MAP,
        )
        if kd.FEATURE.RANGE_POLICY:
            kwargs["range_policy"] = kd.FEATURE.RANGE_POLICY
        return kwargs

    def extra_repr(self) -> str:
        return (
            f"win_size={self.win_size}, win_sigma={self.win_sigma}, K={self.K}, "
            f"data_range={self.data_range}, range_policy={self.range_policy!r}, "
            f"loss_form={self.loss_form!r}, small_map={self.small_map!r}"
        )

    def window_size_for(self, height: int, width: int) -> Optional[int]:
        """Window used for an ``height x width`` map, or ``None`` if the level is skipped."""
        side = min(height, width)
        if side >= self.win_size:
            return self.win_size
        if self.small_map == "skip" or side < 3:
            return None
        return side if side % 2 == 1 else side - 1

    def _warn_once(self, height: int, width: int, size: Optional[int]):
        key = (height, width, size)
        if key in self._warned:
            return
        self._warned.add(key)
        if size is None:
            logger.warning(
                "SSIMFeatureLoss: %dx%d map is smaller than the %d-pixel window "
                "(small_map=%r); the level is skipped (zero loss).",
                height,
                width,
                self.win_size,
                self.small_map,
            )
        else:
            logger.warning(
                "SSIMFeatureLoss: %dx%d map is smaller than the %d-pixel window; using a "
                "%d-pixel window for it.",
                height,
                width,
                self.win_size,
                size,
            )

    def ssim_map(self, student: torch.Tensor, teacher: torch.Tensor) -> Optional[torch.Tensor]:
        """Normalized per-pixel SSIM map (valid region), or ``None`` if the level is skipped."""
        h, w = student.shape[-2:]
        size = self.window_size_for(h, w)
        if size != self.win_size:
            self._warn_once(h, w, size)
        if size is None:
            return None
        with torch.autocast(device_type=student.device.type, enabled=False):
            s, t, _ = normalize_pair(student, teacher, self.range_policy, self.eps)
            return ssim_map(s, t, self.data_range, size, self.win_sigma, self.K)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        weight_map: Optional[torch.Tensor] = None,
        per_image: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            student (Tensor): ``(N, C, H, W)`` student map, any float dtype.
            teacher (Tensor): teacher map of the same shape; detached.
            weight_map (Tensor or None): ``(N, 1, H, W)`` non-negative weights (e.g. foreground
                masks) at the map's resolution; the SSIM map only covers window centres at least
                ``k // 2`` pixels from the border, so the weights are cropped the same way.
            per_image (bool): return ``(N,)`` losses instead of the batch scalar.

        Returns:
            Tensor: float32 scalar (or ``(N,)``). Unweighted, the batch value is the mean of the
            per-image values; weighted, see :func:`~kd_det.modeling.losses.reduce.reduce_loss_map`.
        """
        check_pair(student, teacher, weight_map)
        smap = self.ssim_map(student, teacher)
        if smap is None:
            return attached_zero(student, per_image)
        if weight_map is not None:
            r_h = (student.shape[-2] - smap.shape[-2]) // 2
            r_w = (student.shape[-1] - smap.shape[-1]) // 2
            weight_map = weight_map[..., r_h : r_h + smap.shape[-2], r_w : r_w + smap.shape[-1]]
        loss = reduce_loss_map(1.0 - smap, weight_map, per_image)
        return loss * 0.5 if self.loss_form == "(1-ssim)/2" else loss


@FEATURE_LOSS_REGISTRY.register()
def ssim(cfg) -> SSIMFeatureLoss:
    """``MODEL.KD.FEATURE.LOSS: ssim``: :class:`SSIMFeatureLoss` from the config."""
    return SSIMFeatureLoss(**SSIMFeatureLoss.from_config(cfg))
