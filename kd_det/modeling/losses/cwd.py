"""CWD: channel-wise distillation for dense prediction (Shu et al., ICCV 2021)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .normalize import RANGE_POLICIES, normalize_pair
from .reduce import check_pair
from .registry import FEATURE_LOSS_REGISTRY

__all__ = ["CWDFeatureLoss"]


class CWDFeatureLoss(nn.Module):
    """CWD: each channel as a distribution over its ``H x W`` positions, matched by KL divergence.

    With ``p_c = softmax(t_c / tau)`` and ``q_c = softmax(s_c / tau)`` over the ``H * W`` positions
    of channel ``c`` of one image, an image's value is::

        tau^2 * mean_c sum_hw p_c log(p_c / q_c)

    i.e. KL(teacher || student) summed over positions and averaged over channels; the batch value
    is the mean over images, which equals mmrazor's ``ChannelWiseDivergence`` (sum over ``N * C``
    channels divided by ``N * C``). The student learns where each channel's activation
    concentrates, i.e. which regions the teacher's channels single out (a 1x1 map is one certain
    position: its value is 0). ``tau^2`` keeps gradient magnitudes comparable across temperatures
    (Hinton et al.). Softmax is shift-invariant per channel, but not scale-invariant: a range
    policy rescales the maps and so changes how peaked the distributions are (``"none"``,
    mmrazor's choice, by default). Foreground weight maps are refused: weighting the terms of a
    KL divergence position by position no longer gives a divergence. Computed in float32 with
    autocast off; the teacher is detached.
    """

    def __init__(self, tau: float = 1.0, range_policy: str = "none", eps: float = 1e-3):
        """
        Args:
            tau (float): softmax temperature (``MODEL.KD.FEATURE.CWD_TAU``).
            range_policy (str): see :func:`~kd_det.modeling.losses.normalize.normalize_pair`.
            eps (float): floor of the scale in the range policy.
        """
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}.")
        if range_policy not in RANGE_POLICIES:
            raise ValueError(f"Unknown range_policy {range_policy!r}; expected {RANGE_POLICIES}.")
        self.tau = float(tau)
        self.range_policy = range_policy
        self.eps = float(eps)

    @classmethod
    def from_config(cls, cfg):
        """Constructor arguments from ``MODEL.KD.FEATURE.CWD_TAU`` and ``RANGE_POLICY``."""
        kwargs = {"tau": cfg.MODEL.KD.FEATURE.CWD_TAU}
        if cfg.MODEL.KD.FEATURE.RANGE_POLICY:
            kwargs["range_policy"] = cfg.MODEL.KD.FEATURE.RANGE_POLICY
        return kwargs

    def extra_repr(self) -> str:
        return f"tau={self.tau}, range_policy={self.range_policy!r}"

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        weight_map: Optional[torch.Tensor] = None,
        per_image: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            student (Tensor): ``(N, C, H, W)`` student map (after any channel adapter).
            teacher (Tensor): teacher map of the same shape; detached.
            weight_map: must be ``None`` (``MODEL.KD.FEATURE.FOREGROUND_WEIGHT 0``).
            per_image (bool): return ``(N,)`` values instead of the batch scalar.

        Returns:
            Tensor: float32 scalar (or ``(N,)``), the mean of the per-image values.
        """
        check_pair(student, teacher, weight_map)
        if weight_map is not None:
            raise ValueError(
                "The CWD feature loss compares whole-map distributions and takes no weight map; "
                "set MODEL.KD.FEATURE.FOREGROUND_WEIGHT to 0."
            )
        with torch.autocast(device_type=student.device.type, enabled=False):
            s, t, _ = normalize_pair(student, teacher, self.range_policy, self.eps)
            log_q = F.log_softmax(s.flatten(2) / self.tau, dim=2)
            log_p = F.log_softmax(t.flatten(2) / self.tau, dim=2)
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=2)  # (N, C)
            per = kl.mean(dim=1) * (self.tau * self.tau)
            return per if per_image else per.mean()


@FEATURE_LOSS_REGISTRY.register()
def cwd(cfg) -> CWDFeatureLoss:
    """``MODEL.KD.FEATURE.LOSS: cwd``: :class:`CWDFeatureLoss` with ``FEATURE.CWD_TAU``."""
    return CWDFeatureLoss(**CWDFeatureLoss.from_config(cfg))
