"""The lp-norm feature-hint baselines: mean squared (``mse``) and absolute (``l1``) error."""

import torch
from torch import nn

from .normalize import RANGE_POLICIES, normalize_pair
from .reduce import check_pair, reduce_loss_map
from .registry import FEATURE_LOSS_REGISTRY

__all__ = ["LpFeatureLoss"]


class LpFeatureLoss(nn.Module):
    """Mean squared (``"mse"``) or absolute (``"l1"``) error between feature maps, in float32.

    The lp-norm hint baseline of the SSIM-KD paper compares raw maps, hence ``range_policy="none"``
    by default; the other policies of :func:`~kd_det.modeling.losses.normalize.normalize_pair` make
    lp and SSIM losses comparable (e.g. ``teacher_absmax`` makes the MSE independent of the scale of
    the activations).
    """

    def __init__(self, norm: str = "mse", range_policy: str = "none", eps: float = 1e-3):
        """
        Args:
            norm (str): ``"mse"`` or ``"l1"``.
            range_policy (str): see :func:`~kd_det.modeling.losses.normalize.normalize_pair`.
            eps (float): floor of the teacher scale, see ``normalize_pair``.
        """
        super().__init__()
        if norm not in ("mse", "l1"):
            raise ValueError(f"Unknown norm {norm!r}; expected 'mse' or 'l1'.")
        if range_policy not in RANGE_POLICIES:
            raise ValueError(f"Unknown range_policy {range_policy!r}; expected {RANGE_POLICIES}.")
        self.norm = norm
        self.range_policy = range_policy
        self.eps = float(eps)

    @classmethod
    def from_config(cls, cfg, norm: str):
        """Constructor arguments: ``norm`` and ``MODEL.KD.FEATURE.RANGE_POLICY`` ("" keeps none)."""
        kwargs = {"norm": norm}
        if cfg.MODEL.KD.FEATURE.RANGE_POLICY:
            kwargs["range_policy"] = cfg.MODEL.KD.FEATURE.RANGE_POLICY
        return kwargs

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, range_policy={self.range_policy!r}"

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        weight_map: torch.Tensor = None,
        per_image: bool = False,
    ) -> torch.Tensor:
        """Same arguments and reductions as
        :meth:`~kd_det.modeling.losses.ssim.SSIMFeatureLoss.forward` (no border crop).
        """
        check_pair(student, teacher, weight_map)
        with torch.autocast(device_type=student.device.type, enabled=False):
            s, t, _ = normalize_pair(student, teacher, self.range_policy, self.eps)
            diff = s - t
            loss_map = diff * diff if self.norm == "mse" else diff.abs()
            return reduce_loss_map(loss_map, weight_map, per_image)


@FEATURE_LOSS_REGISTRY.register()
def mse(cfg) -> LpFeatureLoss:
    """``MODEL.KD.FEATURE.LOSS: mse``: squared error, range policy from the config."""
    return LpFeatureLoss(**LpFeatureLoss.from_config(cfg, "mse"))


@FEATURE_LOSS_REGISTRY.register()
def l1(cfg) -> LpFeatureLoss:
    """``MODEL.KD.FEATURE.LOSS: l1``: absolute error, range policy from the config."""
    return LpFeatureLoss(**LpFeatureLoss.from_config(cfg, "l1"))
