"""SSIM feature loss (SSIM-KD): :class:`SSIMFeatureLoss` and its registered builder ``ssim``.

Concepts: both maps first go through a range policy (:mod:`kd_det.modeling.losses.normalize`);
the SSIM map itself, full SSIM or its structure term (:data:`TERMS`), is :func:`ssim_map` of
:mod:`kd_det.modeling.losses.ssim_functional`, re-exported here. Two implementations give the same
loss (``impl``, ``MODEL.KD.SSIM.IMPL``, overridden by the ``KD_DET_SSIM_IMPL`` variable): that
reference (fastest on CPU) and the fused Triton kernels of :mod:`kd_det.layers.fused_ssim` (CUDA).
Maps smaller than the window are shrunk or skipped (``small_map``), and the builder warns once,
before training, about the levels that will be (:func:`small_map_levels`).
See docs/ssim_guide.md for the definition, the terms, the two implementations and small maps.
"""

import functools
import logging
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from kd_det.layers.fused_ssim import fused_ssim_sums, fused_unavailable_reason
from kd_det.layers.ssim_filter import gaussian_valid, gaussian_window

from .normalize import DEFAULT_SSIM_POLICY, POLICY_DATA_RANGE, RANGE_POLICIES, normalize_pair
from .reduce import attached_zero, check_pair, reduce_loss_map
from .registry import FEATURE_LOSS_REGISTRY
from .ssim_functional import TERMS, ssim_map

logger = logging.getLogger(__name__)

__all__ = [
    "IMPL_ENV",
    "IMPLS",
    "LOSS_FORMS",
    "SMALL_MAP_RULES",
    "SSIMFeatureLoss",
    "TERMS",
    "gaussian_valid",
    "gaussian_window",
    "small_map_levels",
    "ssim_map",
]

LOSS_FORMS = ("1-ssim", "(1-ssim)/2")
SMALL_MAP_RULES = ("shrink", "skip")
IMPLS = ("auto", "fused", "reference")
#: Environment variable that overrides ``impl`` / ``MODEL.KD.SSIM.IMPL`` when set (e.g. to rule out
#: the fused kernels while debugging, without editing a config).
IMPL_ENV = "KD_DET_SSIM_IMPL"


@functools.lru_cache(maxsize=64)
def _cached_window(win_size: int, win_sigma: float, device: torch.device) -> torch.Tensor:
    """The 1-D window on ``device``, built once (the fused path reads it at every call)."""
    return gaussian_window(win_size, win_sigma, device)


def _teacher_affine(
    teacher: torch.Tensor, policy: str, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(shift, inv)``, ``(N, C, 1, 1)`` float32, with ``normalize_pair``'s teacher map equal to
    ``(teacher - shift) * inv`` (and the student's too, except for ``"minmax"``).

    The same statistics and operations as :func:`normalize_pair`, so that the fused kernels can
    apply the map on load instead of materializing both normalized maps (tested against it). The
    min/max come from one ``aminmax`` pass in the input dtype (exact), without ``abs()``'s
    full-size temporary.
    """
    n, c = teacher.shape[:2]
    with torch.no_grad():
        if policy == "none":
            zero = teacher.new_zeros((n, c, 1, 1), dtype=torch.float32)
            return zero, zero + 1.0
        if policy == "standardize":
            var, mean = torch.var_mean(teacher.float(), dim=(2, 3), keepdim=True, correction=0)
            return mean, var.sqrt().clamp_min(eps).reciprocal()
        if policy == "minmax":  # the teacher's own range over the whole level, per image
            lo, hi = torch.aminmax(teacher.reshape(n, -1), dim=1)
            lo, hi = lo.float().view(n, 1, 1, 1), hi.float().view(n, 1, 1, 1)
            inv = (hi - lo).clamp_min(eps).reciprocal()
            return lo.expand(n, c, 1, 1), inv.expand(n, c, 1, 1)
        lo, hi = torch.aminmax(teacher.reshape(n, c, -1), dim=2)
        lo, hi = lo.float().view(n, c, 1, 1), hi.float().view(n, c, 1, 1)
        if policy == "teacher_absmax":
            half = torch.maximum(hi, -lo).clamp_min(eps)
            return -half, (2.0 * half).reciprocal()
        return lo, (hi - lo).clamp_min(eps).reciprocal()  # teacher_minmax


class SSIMFeatureLoss(nn.Module):
    """SSIM-KD feature loss ``mean(1 - SSIM(student, teacher))`` for one feature level.

    Always computed in float32 with autocast disabled: the SSIM ratios of ``E[x^2] - mu^2`` lose
    all precision in fp16/bf16 (the fused kernels read half-precision inputs but accumulate in
    float32). The teacher is detached.
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
        impl: str = "auto",
        terms: str = "full",
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
            impl (str): ``"auto"`` (fused Triton kernels for CUDA tensors when triton is
                installed, the reference otherwise), ``"fused"`` (an error where the kernels
                cannot run; on CPU they run only under ``TRITON_INTERPRET=1``) or
                ``"reference"``. The environment variable ``KD_DET_SSIM_IMPL``, when set, wins.
            terms (str): ``"full"`` SSIM or ``"structure"``, its structure term alone (the
                reference path only: ``impl="fused"`` is then refused, ``"auto"`` takes the
                reference).
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
        if impl not in IMPLS:
            raise ValueError(f"Unknown SSIM impl {impl!r} (MODEL.KD.SSIM.IMPL); expected {IMPLS}.")
        if terms not in TERMS:
            raise ValueError(
                f"Unknown SSIM terms {terms!r} (MODEL.KD.SSIM.TERMS); expected {TERMS}."
            )
        self.terms = terms
        self.win_size = int(win_size)
        self.win_sigma = float(win_sigma)
        self.K = (float(K[0]), float(K[1]))
        self.data_range = float(data_range)
        self.range_policy = range_policy
        self.loss_form = loss_form
        self.small_map = small_map
        self.eps = float(eps)
        self.impl = impl
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
            impl=kd.SSIM.IMPL,
            terms=kd.SSIM.TERMS,
        )
        if kd.FEATURE.RANGE_POLICY:
            kwargs["range_policy"] = kd.FEATURE.RANGE_POLICY
        return kwargs

    def extra_repr(self) -> str:
        return (
            f"win_size={self.win_size}, win_sigma={self.win_sigma}, K={self.K}, "
            f"data_range={self.data_range}, range_policy={self.range_policy!r}, "
            f"loss_form={self.loss_form!r}, small_map={self.small_map!r}, impl={self.impl!r}, "
            f"terms={self.terms!r}"
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

    def resolved_impl(self, device) -> str:
        """``"fused"`` or ``"reference"``: what :meth:`forward` runs for tensors on ``device``.

        Raises:
            RuntimeError: ``"fused"`` was asked for where the kernels cannot run, or with
                ``terms="structure"``, which only the reference computes.
            ValueError: ``KD_DET_SSIM_IMPL`` holds an unknown value.
        """
        impl, source = self.impl, "MODEL.KD.SSIM.IMPL"
        env = os.environ.get(IMPL_ENV, "").strip().lower()
        if env:
            if env not in IMPLS:
                raise ValueError(f"Unknown {IMPL_ENV}={env!r}; expected one of {IMPLS}.")
            impl, source = env, IMPL_ENV
        if impl == "reference":
            return "reference"
        if self.terms != "full":
            if impl == "fused":
                raise RuntimeError(
                    f"{source}='fused' but MODEL.KD.SSIM.TERMS={self.terms!r}: the fused "
                    "kernels compute full SSIM only. Set MODEL.KD.SSIM.IMPL (or "
                    f"{IMPL_ENV}) to 'auto' or 'reference'."
                )
            return "reference"
        reason = fused_unavailable_reason(device)
        if impl == "auto":
            return (
                "fused" if reason is None and torch.device(device).type == "cuda" else "reference"
            )
        if reason is not None:
            raise RuntimeError(
                f"{source}='fused' but {reason}. Set MODEL.KD.SSIM.IMPL (or {IMPL_ENV}) to "
                "'auto' or 'reference' to use the reference SSIM."
            )
        return "fused"

    def _window_for(self, student: torch.Tensor) -> Optional[int]:
        h, w = student.shape[-2:]
        size = self.window_size_for(h, w)
        if size != self.win_size:
            self._warn_once(h, w, size)
        return size

    def ssim_map(self, student: torch.Tensor, teacher: torch.Tensor) -> Optional[torch.Tensor]:
        """Normalized per-pixel SSIM map (valid region), or ``None`` if the level is skipped.

        Always the reference implementation: the fused path never materializes the map.
        """
        size = self._window_for(student)
        if size is None:
            return None
        with torch.autocast(device_type=student.device.type, enabled=False):
            s, t, _ = normalize_pair(student, teacher, self.range_policy, self.eps)
            return ssim_map(s, t, self.data_range, size, self.win_sigma, self.K, self.terms)

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
        if self.resolved_impl(student.device) == "fused":
            size = self._window_for(student)
            if size is None:
                return attached_zero(student, per_image)
            loss = self._fused_loss(student, teacher, size, weight_map, per_image)
        else:
            smap = self.ssim_map(student, teacher)
            if smap is None:
                return attached_zero(student, per_image)
            if weight_map is not None:
                weight_map = _crop(weight_map, student.shape[-2] - smap.shape[-2])
            loss = reduce_loss_map(1.0 - smap, weight_map, per_image)
        return loss * 0.5 if self.loss_form == "(1-ssim)/2" else loss

    def _fused_loss(self, student, teacher, size, weight_map, per_image):
        """The loss from :func:`~kd_det.layers.fused_ssim.fused_ssim_sums`: per-image sums of
        ``w * (1 - SSIM)``, reduced exactly as :func:`reduce_loss_map` reduces the map."""
        n, c, h, w = student.shape
        with torch.autocast(device_type=student.device.type, enabled=False):
            teacher = teacher.detach()
            shift_y, inv_y = _teacher_affine(teacher, self.range_policy, self.eps)
            own_range = self.eps if self.range_policy == "minmax" else None
            # minmax: the student is normalized by its own range inside the kernels, which also
            # add the gradient through its min and max; the other policies reuse the teacher's.
            shift_x, inv_x = (None, None) if own_range is not None else (shift_y, inv_y)
            x = student if student.dtype in _FUSED_DTYPES else student.float()
            teacher = teacher if teacher.dtype in _FUSED_DTYPES else teacher.float()
            window = _cached_window(size, self.win_sigma, student.device)
            c1 = (self.K[0] * self.data_range) ** 2
            c2 = (self.K[1] * self.data_range) ** 2
            w_crop = None if weight_map is None else _crop(weight_map.detach(), size - 1)
            sums = fused_ssim_sums(
                x, teacher, window, c1, c2, shift_x, inv_x, shift_y, inv_y, w_crop, own_range
            )
            if w_crop is None:
                per = sums / float(c * (h - size + 1) * (w - size + 1))
                return per if per_image else per.mean()
            den = w_crop.float().flatten(1).sum(dim=1) * c
            tiny = torch.finfo(den.dtype).tiny
            if per_image:
                return sums / den.clamp_min(tiny)
            return sums.sum() / den.sum().clamp_min(tiny)


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _crop(weight_map: torch.Tensor, shrink: int) -> torch.Tensor:
    """``weight_map`` cut to the SSIM map's valid region: ``shrink // 2`` pixels off each side."""
    r = shrink // 2
    h, w = weight_map.shape[-2:]
    return weight_map[..., r : h - shrink + r, r : w - shrink + r]


def _level_stride(name: str) -> Optional[int]:
    """Stride of a feature named like detectron2's FPN and ResNet outputs (``p4``: 16, ``res3``:
    8); None for other names, whose size the config alone does not tell."""
    digits = name[len(name.rstrip("0123456789")) :]
    if not digits or name[: len(name) - len(digits)] not in ("p", "res"):
        return None
    return 2 ** int(digits)


def _distilled_levels(cfg) -> Tuple[str, ...]:
    """The feature levels the config's feature loss is applied to: FPN and backbone hints of
    ``DistillationRCNN``, the mutual and EMA feature levels of ``OnlineDistillationRCNN``."""
    if cfg.MODEL.META_ARCHITECTURE == "OnlineDistillationRCNN":
        return tuple(cfg.MODEL.ONLINE_KD.FEATURE_LEVELS)
    kd = cfg.MODEL.KD
    return tuple(kd.FEATURE.LEVELS) + tuple(kd.BACKBONE.LEVELS)


def small_map_levels(cfg, loss: SSIMFeatureLoss):
    """``[(level, side, window or None)]``: the distilled levels whose maps are smaller than the
    SSIM window at the config's smallest input side, with the window they get (``None``:
    skipped).

    The short side of an input is at least ``min(INPUT.MIN_SIZE_TRAIN)`` in training and
    ``INPUT.MIN_SIZE_TEST`` at test (detectron2's ``ResizeShortestEdge``), and a level of stride
    ``s`` has a short side of ``ceil(side / s)``. Inputs larger than that (another
    ``MIN_SIZE_TRAIN`` choice, padding) only give larger maps, so a level listed here is too small
    for at least some images.
    """
    side_in = _input_side(cfg)
    if side_in is None:
        return []
    out = []
    for lvl in _distilled_levels(cfg):
        stride = _level_stride(lvl)
        if stride is None:
            continue
        side = -(-side_in // stride)
        if side < loss.win_size:
            out.append((lvl, side, loss.window_size_for(side, side)))
    return out


def _input_side(cfg) -> Optional[int]:
    """The smallest short side an input gets in training or at test (None if unset)."""
    sizes = [int(v) for v in cfg.INPUT.MIN_SIZE_TRAIN] + [int(cfg.INPUT.MIN_SIZE_TEST)]
    sizes = [v for v in sizes if v > 0]
    return min(sizes) if sizes else None


_BUILD_WARNED = set()


def _warn_small_maps(cfg, loss: SSIMFeatureLoss):
    """One warning per configuration, when the model is built, naming every distilled level that
    is smaller than the window and what happens to it (the per-shape warnings of
    :meth:`SSIMFeatureLoss._warn_once` come later, during the first steps, one line per shape)."""
    small = small_map_levels(cfg, loss)
    if not small:
        return
    side_in = _input_side(cfg)
    key = (side_in, loss.win_size, loss.small_map, tuple(small))
    if key in _BUILD_WARNED:
        return
    _BUILD_WARNED.add(key)
    parts = [
        f"{lvl} ({side}x{side}: "
        + ("skipped, zero loss" if win is None else f"window shrunk to {win}")
        + ")"
        for lvl, side, win in small
    ]
    logger.warning(
        "SSIM feature loss: at a %d px input side, %d of the distilled levels are smaller than "
        "the %d-pixel SSIM window: %s. A shrunk window compares a few pixels (a 3-pixel window "
        "is nearly a per-pixel comparison) and a skipped level adds nothing, so on these levels "
        "SSIM sees little or no spatial structure. The method study found SSIM no better than "
        "MSE at 128 px (docs/ssim_guide.md): use a larger input, a smaller "
        "MODEL.KD.SSIM.WINDOW_SIZE, or drop these levels from the distilled levels.",
        side_in,
        len(small),
        loss.win_size,
        ", ".join(parts),
    )


@FEATURE_LOSS_REGISTRY.register()
def ssim(cfg) -> SSIMFeatureLoss:
    """``MODEL.KD.FEATURE.LOSS: ssim``: :class:`SSIMFeatureLoss` from the config; warns once,
    before training, about levels smaller than the window (:func:`small_map_levels`)."""
    loss = SSIMFeatureLoss(**SSIMFeatureLoss.from_config(cfg))
    _warn_small_maps(cfg, loss)
    return loss
