"""Feature-hint losses between student and teacher FPN maps: SSIM (SSIM-KD) and lp baselines.

The maps distilled by kd_det are FPN outputs ``p2``..``p6``: signed, unbounded activations of shape
``(N, C, H, W)``. SSIM was designed for non-negative images, and on signed maps it has a trap: its
luminance term ``(2 mu_s mu_t + C1) / (mu_s^2 + mu_t^2 + C1)`` and its contrast-structure term
``(2 sigma_st + C2) / (sigma_s^2 + sigma_t^2 + C2)`` are *both* negative for a sign-flipped student,
and their product is positive, so ``-teacher`` looks similar to ``teacher``. This module therefore
maps both maps into a common range before SSIM, with statistics of the TEACHER only (detached), so
the student cannot move the yardstick it is measured with. See :func:`normalize_pair`.

Choice of the default range policy (numbers measured with pytorch-msssim 1.0.0, window 11, on
random ``(2, 8, 32, 32)`` maps; loss = ``1 - ssim``, "unrelated" = spatially permuted teacher):

==================  ========================  =====  =====  =========
maps                policy                    noisy  flip   unrelated
==================  ========================  =====  =====  =========
standardized        standardize (range 6)     0.026  0.494  0.998
standardized        teacher_minmax            0.005  1.951  0.973
standardized        teacher_absmax            0.005  1.945  0.970
ReLU(randn)         standardize (range 6)     0.025  1.038  0.989
ReLU(randn)         teacher_minmax            0.006  0.041  0.994
ReLU(randn)         teacher_absmax            0.005  1.847  0.950
randn + ch. offset  teacher_minmax            0.005  1.142  0.986
randn + ch. offset  teacher_absmax            0.005  1.590  0.932
smooth, mean 1      teacher_minmax            0.010  0.815  0.969
smooth, mean 1      teacher_absmax            0.009  1.624  0.938
==================  ========================  =====  =====  =========

("noisy" = teacher + 0.1 * per-channel std Gaussian noise, "flip" = ``-teacher``.)

* ``standardize`` with the teacher's mean/std fails on zero-mean maps: the flipped student scores
  0.49, i.e. *better* than an unrelated student (0.998) - the trap above, since zero-mean maps stay
  signed after standardization.
* ``teacher_minmax`` (the teacher's min/max -> [0, 1]) fixes zero-mean maps but fails on maps that
  are mostly positive: on ReLU maps the flip scores 0.041 (vs 0.994 unrelated), on smooth positive
  maps 0.815 (< 0.969). The flipped student falls below 0 and both SSIM terms go negative again.
* ``teacher_absmax`` (default) maps ``[-M, M]`` -> ``[0, 1]`` with ``M = max |teacher|`` per image
  and channel. Zero maps to 0.5 and ``[-M, M]`` is closed under negation, so a sign-flipped student
  stays inside ``[0, 1]``: a flip becomes a brightness inversion around mid-grey, which SSIM
  handles as it does for images. The flip is the worst case everywhere (>= 1.59, above every
  unrelated student), a noisy copy scores about 0.005, and a channel with a constant non-zero
  teacher does not need the ``eps`` floor. The price is contrast: on one-signed maps the teacher
  only uses half of ``[0, 1]`` (more if it has a large offset), which the fixed ``C1``/``C2`` feel
  slightly (unrelated students score 0.93-0.95 instead of 0.97-0.99).

A policy with the joint (teacher and student) min/max also passes these tests, but it lets a
student outlier widen the range and so shrink the loss of every other pixel; it is not provided.

SSIM map, windows and skimage: the SSIM map is computed with a separable Gaussian "valid"
convolution (no padding), like ``pytorch_msssim``; its mean equals ``pytorch_msssim.ssim`` (and
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``, whose reflect-padded full map cropped by the window radius 5 is the
same valid region). Maps smaller than the window are handled explicitly (``small_map``) instead of
``pytorch_msssim``'s silent "Skipping Gaussian Smoothing".
"""

import functools
import logging
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d
from torch import nn
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

RANGE_POLICIES = ("teacher_absmax", "teacher_minmax", "standardize", "none")
DEFAULT_SSIM_POLICY = "teacher_absmax"
# Data range a policy's output is meant to have; "none" has no natural range.
_POLICY_DATA_RANGE = {
    "teacher_absmax": 1.0,
    "teacher_minmax": 1.0,
    "standardize": 6.0,
    "none": None,
}
LOSS_FORMS = ("1-ssim", "(1-ssim)/2")
SMALL_MAP_RULES = ("shrink", "skip")
FEATURE_LOSSES = ("mse", "l1", "ssim")


def normalize_pair(
    student: torch.Tensor,
    teacher: torch.Tensor,
    policy: str = DEFAULT_SSIM_POLICY,
    eps: float = 1e-3,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[float]]:
    """Map a student and a teacher map into a common range using the teacher's statistics.

    All statistics are per image and per channel (over ``H, W``) and come from the detached
    teacher, so the normalization is a fixed affine map for the student: gradients pass through it
    unchanged in direction and the student cannot shrink its loss by moving the range.

    Args:
        student (Tensor): ``(N, C, H, W)`` student map; keeps its graph.
        teacher (Tensor): teacher map of the same shape; detached here.
        policy (str): one of
            ``"teacher_absmax"``: ``(x + M) / 2M`` with ``M = max |teacher|``; the teacher lies in
            ``[0, 1]`` and so does any student with ``|student| <= M``, sign flips included.
            ``"teacher_minmax"``: ``(x - min) / (max - min)`` of the teacher; the student may fall
            outside ``[0, 1]``.
            ``"standardize"``: ``(x - mean) / std`` of the teacher (population std).
            ``"none"``: maps returned unchanged (but as float32).
        eps (float): floor of the teacher scale (``M``, ``max - min`` or ``std``) in activation
            units. A dead teacher channel would otherwise divide the student by ~0, and the huge
            normalized values make SSIM's curvature (and gradients) explode.

    Returns:
        tuple: ``(student_n, teacher_n, data_range)``, float32 maps and the data range the policy
        is meant to be used with (1 for the min/max policies, 6 ~ +-3 sigma for ``standardize``,
        ``None`` for ``"none"``).
    """
    if policy not in RANGE_POLICIES:
        raise ValueError(f"Unknown range policy {policy!r}; expected one of {RANGE_POLICIES}.")
    student = student.float()
    teacher = teacher.detach().float()
    if policy == "none":
        return student, teacher, None
    with torch.no_grad():
        if policy == "teacher_absmax":
            half = teacher.abs().amax(dim=(2, 3), keepdim=True).clamp_min(eps)
            shift, scale = -half, 2.0 * half
        elif policy == "teacher_minmax":
            lo = teacher.amin(dim=(2, 3), keepdim=True)
            hi = teacher.amax(dim=(2, 3), keepdim=True)
            shift, scale = lo, (hi - lo).clamp_min(eps)
        else:  # standardize
            var, mean = torch.var_mean(teacher, dim=(2, 3), keepdim=True, correction=0)
            shift, scale = mean, var.sqrt().clamp_min(eps)
        inv = scale.reciprocal()
        teacher_n = (teacher - shift) * inv
    return (student - shift) * inv, teacher_n, _POLICY_DATA_RANGE[policy]


# Longest run of filter outputs computed by one dense band matrix; longer runs are split into tiles
# of about _BAND_TILE outputs (see _filter_dim for the measurements behind both numbers).
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

    Why matrix products instead of ``F.conv2d(groups=C)``: on this CPU the depthwise convolution
    ran at ~3 GFLOP/s, and multiplying by a dense band matrix (``length / k`` times more FLOPs but
    BLAS) was ~1.7x faster for stacked FPN maps up to 336 pixels per side (2x1280x128x160: 563 ms vs
    1040 ms; 2x256x200x336: 690 vs 1161 ms; one thread). At 672 pixels the dense band lost (943 vs
    597 ms) while tiles of 64-192 outputs were on par or better (346-460 ms), hence the tiling.
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


def _gaussian_valid(x: torch.Tensor, win_size: int, win_sigma: float) -> torch.Tensor:
    """Separable Gaussian "valid" filter over ``H`` then ``W`` (pytorch_msssim's order)."""
    return _filter_dim(_filter_dim(x, -2, win_size, win_sigma), -1, win_size, win_sigma)


def _gaussian_valid_adjoint(g: torch.Tensor, win_size: int, win_sigma: float) -> torch.Tensor:
    """Adjoint of :func:`_gaussian_valid`: maps a valid-size gradient back to input size."""
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
        mu_x, mu_y, e_xx, e_yy, e_xy = _gaussian_valid(stack, win_size, win_sigma).split(c, 1)
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
    order) to float rounding, at ~0.6x its forward+backward time (P2-P6 of 2x512x640, 256 channels,
    one CPU thread: 1.27-1.44 s vs 2.12 s; MSE 0.06 s; see tools/benchmark_ssim.py).

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


def _attached_zero(student: torch.Tensor, per_image: bool) -> torch.Tensor:
    """A zero loss that still depends on ``student``.

    Returning a detached zero for a skipped level would leave the parameters that produce that
    level without gradients, which breaks DDP (``find_unused_parameters=False``). ``nan_to_num``
    keeps it zero (not NaN) even if the student holds non-finite values.
    """
    zero = torch.nan_to_num(student.float(), nan=0.0, posinf=0.0, neginf=0.0).mul(0.0)
    zero = zero.flatten(1).sum(dim=1)
    return zero if per_image else zero.sum()


def _reduce(
    loss_map: torch.Tensor, weight_map: Optional[torch.Tensor], per_image: bool
) -> torch.Tensor:
    """Mean of ``loss_map`` (N, C, h, w), optionally weighted by ``weight_map`` (N, 1, h, w).

    Weighted, the batch value is ``sum(w * l) / (C * sum(w))`` over the whole batch, i.e. every
    weighted pixel counts the same wherever it is; per image the same ratio is taken per image, so
    the batch value is the per-image values averaged with weights ``sum(w_n)``. A zero total weight
    gives 0 (not 0/0).
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


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, weight_map: Optional[torch.Tensor]):
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
                one policy whose sign-flipped student is the worst case (module docstring).
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
            data_range = _POLICY_DATA_RANGE[range_policy]
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
            per-image values; weighted, see :func:`_reduce`.
        """
        _check_pair(student, teacher, weight_map)
        smap = self.ssim_map(student, teacher)
        if smap is None:
            return _attached_zero(student, per_image)
        if weight_map is not None:
            r_h = (student.shape[-2] - smap.shape[-2]) // 2
            r_w = (student.shape[-1] - smap.shape[-1]) // 2
            weight_map = weight_map[..., r_h : r_h + smap.shape[-2], r_w : r_w + smap.shape[-1]]
        loss = _reduce(1.0 - smap, weight_map, per_image)
        return loss * 0.5 if self.loss_form == "(1-ssim)/2" else loss


class LpFeatureLoss(nn.Module):
    """Mean squared (``"mse"``) or absolute (``"l1"``) error between feature maps, in float32.

    The lp-norm hint baseline of the SSIM-KD paper compares raw maps, hence ``range_policy="none"``
    by default; the other policies of :func:`normalize_pair` make lp and SSIM losses comparable.
    """

    def __init__(self, norm: str = "mse", range_policy: str = "none", eps: float = 1e-3):
        """
        Args:
            norm (str): ``"mse"`` or ``"l1"``.
            range_policy (str): see :func:`normalize_pair`.
            eps (float): floor of the teacher scale, see :func:`normalize_pair`.
        """
        super().__init__()
        if norm not in ("mse", "l1"):
            raise ValueError(f"Unknown norm {norm!r}; expected 'mse' or 'l1'.")
        if range_policy not in RANGE_POLICIES:
            raise ValueError(f"Unknown range_policy {range_policy!r}; expected {RANGE_POLICIES}.")
        self.norm = norm
        self.range_policy = range_policy
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, range_policy={self.range_policy!r}"

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        weight_map: Optional[torch.Tensor] = None,
        per_image: bool = False,
    ) -> torch.Tensor:
        """Same arguments and reductions as :meth:`SSIMFeatureLoss.forward` (no border crop)."""
        _check_pair(student, teacher, weight_map)
        with torch.autocast(device_type=student.device.type, enabled=False):
            s, t, _ = normalize_pair(student, teacher, self.range_policy, self.eps)
            diff = s - t
            loss_map = diff * diff if self.norm == "mse" else diff.abs()
            return _reduce(loss_map, weight_map, per_image)


def build_feature_loss(name: str, **kwargs) -> nn.Module:
    """Build a feature-hint loss by name: ``"mse"``, ``"l1"`` or ``"ssim"``.

    Args:
        name (str): loss name (case-insensitive).
        **kwargs: passed to :class:`LpFeatureLoss` (``range_policy``, ``eps``) or
            :class:`SSIMFeatureLoss`.
    """
    key = name.lower()
    if key in ("mse", "l1"):
        return LpFeatureLoss(norm=key, **kwargs)
    if key == "ssim":
        return SSIMFeatureLoss(**kwargs)
    raise ValueError(f"Unknown feature loss {name!r}; expected one of {FEATURE_LOSSES}.")
