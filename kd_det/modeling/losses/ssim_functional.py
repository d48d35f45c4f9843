"""The SSIM map as a function: the reference computation behind the SSIM feature loss.

:func:`ssim_map` is the per-pixel SSIM of a student map against a constant teacher map over the
valid region of a separable Gaussian window, or, with ``terms="structure"`` (:data:`TERMS`), the
structure term alone. Its autograd Function :class:`_SSIMMap` saves three derivative maps in the
forward, so the backward is one adjoint filter. The loss module around it (range policies,
weights, the fused CUDA path, small maps) is :mod:`kd_det.modeling.losses.ssim`, which re-exports
these names. See docs/ssim_guide.md for what is compared, docs/ssim_kernel.md for the derivatives.
"""

from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from kd_det.layers.ssim_filter import gaussian_valid, gaussian_valid_adjoint

__all__ = ["TERMS", "ssim_map"]

#: What the loss compares: full SSIM (luminance x contrast x structure) or the structure term only.
TERMS = ("full", "structure")


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

    With ``structure=True`` the map is the structure term alone, ``s = (cxy + C3) / D`` with
    ``cxy = exy - mx my``, ``D = sx sy + C3``, ``sx = sqrt(vx)``, ``C3 = C2 / 2``, and::

        d s / d exy = 1 / D
        d s / d exx = -s sy m' / (2 D sx)      (m' = [vx > 0]: a flat student window gets 0)
        d s / d mx  = -my (d/d exy) - 2 mx (d/d exx)

    The backward is the same three-coefficient adjoint as for full SSIM.
    """

    @staticmethod
    def forward(ctx, x, y, win_size, win_sigma, c1, c2, structure=False):
        n, c, h, w = x.shape
        stack = x.new_empty((n, 5 * c, h, w))
        stack[:, :c].copy_(x)
        stack[:, c : 2 * c].copy_(y)
        torch.mul(x, x, out=stack[:, 2 * c : 3 * c])
        torch.mul(y, y, out=stack[:, 3 * c : 4 * c])
        torch.mul(x, y, out=stack[:, 4 * c :])
        mu_x, mu_y, e_xx, e_yy, e_xy = gaussian_valid(stack, win_size, win_sigma).split(c, 1)
        del stack
        ctx.window = (win_size, win_sigma)
        if structure:
            return _structure_forward(ctx, x, y, mu_x, mu_y, e_xx, e_yy, e_xy, c2 / 2.0)
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
        return ssim

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, coef = ctx.saved_tensors
        n, c = x.shape[:2]
        # backward() may be called inside an autocast region; keep the adjoint filter in float32.
        with torch.autocast(device_type=x.device.type, enabled=False):
            g = (coef * grad.to(coef.dtype).unsqueeze(1)).view(n, 3 * c, *grad.shape[-2:])
            d_mu, d_exx, d_exy = gaussian_valid_adjoint(g, *ctx.window).split(c, 1)
            grad_x = torch.addcmul(d_mu, x, d_exx, value=2.0).addcmul_(y, d_exy)
        return grad_x, None, None, None, None, None, None


def _structure_forward(ctx, x, y, mu_x, mu_y, e_xx, e_yy, e_xy, c3):
    """Forward of :class:`_SSIMMap` for the structure term alone (formulas in its docstring).

    ``sqrt`` has an infinite slope at 0, so a student window whose variance is exactly 0 (or
    rounds below it) gets a zero ``d/d exx`` instead of an infinite one. Its value is then
    ``C3 / C3 = 1``: the structure term cannot tell a flat window from a matching one (a property
    of the term, not of this code; full SSIM's contrast term is what penalizes a flat student).
    """
    mu_xy = mu_x * mu_y
    cov = e_xy.sub_(mu_xy)
    var_x = e_xx.sub_(mu_x * mu_x)
    var_x_active = var_x > 0
    sd_x = var_x.clamp_(min=0.0).sqrt_()
    sd_y = e_yy.sub_(mu_y * mu_y).clamp_(min=0.0).sqrt_()
    den = (sd_x * sd_y).add_(c3)
    struct = (cov + c3).div_(den)
    if ctx.needs_input_grad[0]:
        n, c = x.shape[:2]
        coef = x.new_empty((n, 3, c) + struct.shape[-2:])
        d_mu, d_exx, d_exy = coef.unbind(1)
        torch.reciprocal(den, out=d_exy)
        # -s sy / (2 D sx) where vx > 0; the clamp only keeps 0 * inf out of flat windows.
        torch.mul(struct, sd_y, out=d_exx).div_(den).div_(sd_x.clamp(min=1e-30)).mul_(-0.5)
        d_exx.mul_(var_x_active)
        torch.mul(mu_y, d_exy, out=d_mu).neg_().addcmul_(mu_x, d_exx, value=-2.0)
        ctx.save_for_backward(x, y, coef)
    return struct


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    win_size: int = 11,
    win_sigma: float = 1.5,
    K: Sequence[float] = (0.01, 0.03),
    terms: str = "full",
) -> torch.Tensor:
    """Per-pixel SSIM of ``x`` against a constant reference ``y`` (the teacher), valid region.

    Why not ``pytorch_msssim.ssim``: it only returns means, and the weighted (foreground) loss needs
    the map. The values equal pytorch_msssim's map (same kernel, same valid filtering, same filter
    order) to float rounding, and the hand-written backward of :class:`_SSIMMap` makes it faster
    (README, ``dev/benchmark_ssim.py``).

    Args:
        x (Tensor): ``(N, C, H, W)`` student map (gradients flow to it), float32 or float64.
        y (Tensor): teacher map of the same shape and dtype; treated as a constant.
        data_range (float): value range that sets ``C1 = (K1 R)^2``, ``C2 = (K2 R)^2``.
        win_size (int): odd window, ``<= min(H, W)``.
        win_sigma (float): Gaussian sigma.
        K (sequence): ``(K1, K2)``.
        terms (str): ``"full"`` (SSIM) or ``"structure"`` (the structure term alone,
            ``(sigma_xy + C3) / (sigma_x sigma_y + C3)`` with ``C3 = C2 / 2``).

    Returns:
        Tensor: ``(N, C, H - k + 1, W - k + 1)``; pixel ``(i, j)`` is the SSIM of the window
        centred at ``(i + k // 2, j + k // 2)`` of the inputs.
    """
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"Map {tuple(x.shape)} is smaller than the {win_size}-pixel window.")
    if x.dtype != y.dtype or not x.is_floating_point():
        raise ValueError(f"x and y must share a floating dtype, got {x.dtype} and {y.dtype}.")
    if terms not in TERMS:
        raise ValueError(f"Unknown SSIM terms {terms!r} (MODEL.KD.SSIM.TERMS); expected {TERMS}.")
    c1 = (K[0] * data_range) ** 2
    c2 = (K[1] * data_range) ** 2
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _apply_ssim_map(
            x, y.detach(), int(win_size), float(win_sigma), c1, c2, terms == "structure"
        )


# Kept out of torch.compile graphs: dynamo traced the Function's forward line by line (its ``out=``
# writes into views of preallocated buffers break the graph at each line), and under dynamic shapes
# (a second feature level) AOTAutograd failed on those aliased views ("Expected
# !size_bytes_is_heap_allocated_"). The Function is already hand-fused, so running it eagerly loses
# nothing; the range policy and the reduction around it are still compiled.
_apply_ssim_map = getattr(getattr(torch, "compiler", None), "disable", lambda fn: fn)(
    _SSIMMap.apply
)
