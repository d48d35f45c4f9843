"""PKD: feature distillation via the Pearson correlation coefficient (Cao et al., 2022)."""

from typing import Optional

import torch
from torch import nn

from .reduce import check_pair, reduce_loss_map
from .registry import FEATURE_LOSS_REGISTRY

__all__ = ["PKDFeatureLoss", "standardize_channels"]


def standardize_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and population variance of each image and
    channel over ``(H, W)``.

    ``eps`` sits under the square root (not added to the std) so that a constant channel gives a
    zero map with a finite gradient; the gradient of ``std`` itself is 0/0 there.
    """
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    return (x - mean) * torch.rsqrt(var + eps)


class PKDFeatureLoss(nn.Module):
    """PKD: ``0.5 * mean((z_s - z_t)^2)`` of channel-standardized student and teacher maps.

    Each channel of each map is standardized separately (:func:`standardize_channels`), teacher
    and student each with their own statistics, so the loss sees only where a channel is high or
    low relative to itself: the magnitude gap between a teacher and a smaller student (and any
    positive per-channel scale or offset of the student) costs nothing. With population statistics
    ``mean(z^2) = 1``, so per channel ``0.5 * mean_hw((z_s - z_t)^2) = 1 - r``, where ``r`` is the
    Pearson correlation of the two channels over ``H x W``: an image's value is
    ``mean_c(1 - r_c)``, in ``[0, 2]``, 0 for identical maps (up to ``eps``). A 1x1 map (P6 of a
    small image) has no spatial pattern: both sides standardize to 0 and the value is 0.

    Statistics are per image over ``(H, W)``, not over the batch ``(N, H, W)`` as in mmrazor's
    ``PKDLoss`` (which also uses the unbiased std plus ``1e-6``): per-image statistics keep the
    term per image like every kd_det term (one image's value does not depend on the others in its
    batch, so hint weighting and the valid-image mean work as for the other losses). Range
    policies are per-channel (or per-level) positive affine maps that standardization undoes, so
    PKD takes none. Computed in float32 with autocast off; the teacher is detached.
    """

    def __init__(self, eps: float = 1e-6):
        """
        Args:
            eps (float): added to each channel's variance before the square root (squared
                activation units); keeps constant channels finite.
        """
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.eps = float(eps)

    @classmethod
    def from_config(cls, cfg):
        """No config keys: PKD has no hyperparameter besides its weight (``FEATURE.WEIGHTS``)."""
        return {}

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

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
            weight_map (Tensor or None): ``(N, 1, H, W)`` per-pixel weights of the squared
                differences (foreground weighting); the statistics stay unweighted.
            per_image (bool): return ``(N,)`` values instead of the batch scalar.

        Returns:
            Tensor: float32 scalar (or ``(N,)``), reduced as
            :func:`~kd_det.modeling.losses.reduce.reduce_loss_map`.
        """
        check_pair(student, teacher, weight_map)
        with torch.autocast(device_type=student.device.type, enabled=False):
            z_s = standardize_channels(student.float(), self.eps)
            z_t = standardize_channels(teacher.detach().float(), self.eps)
            diff = z_s - z_t
            return reduce_loss_map(0.5 * diff * diff, weight_map, per_image)


@FEATURE_LOSS_REGISTRY.register()
def pkd(cfg) -> PKDFeatureLoss:
    """``MODEL.KD.FEATURE.LOSS: pkd``: :class:`PKDFeatureLoss`."""
    return PKDFeatureLoss(**PKDFeatureLoss.from_config(cfg))
