"""A weighted sum of registered feature losses: one hint that adds, e.g., SSIM on top of PKD.

``DistillationRCNN`` applies one feature loss (``MODEL.KD.FEATURE.LOSS``) on every distilled
level, with one weight per level (``MODEL.KD.FEATURE.WEIGHTS``). To combine two losses on the same
levels without a second set of hint keys, ``MODEL.KD.FEATURE.LOSS: feature_sum`` builds
:class:`FeatureLossSum` from ``MODEL.KD.FEATURE_SUM``:

* ``LOSSES``: names of registered feature losses (each built from the config as if it were
  ``FEATURE.LOSS``, so ``SSIM.*`` and ``FEATURE.RANGE_POLICY`` reach an ``ssim`` part);
* ``WEIGHTS``: one weight per part (one value for all parts is allowed).

The level's value is ``FEATURE.WEIGHTS[level] * sum_i WEIGHTS[i] * LOSSES[i](student, teacher)``.
The SSIM-on-PKD check of the SSIM diagnosis (``projects/MethodStudy``, ``results/ssim_diagnosis``)
uses ``LOSSES ["pkd", "ssim"]``, ``WEIGHTS [12.0, 3.0]``, ``FEATURE.WEIGHTS [1.0]``: each part at
its tuned weight.
"""

from typing import Optional, Sequence

import torch
from torch import nn

from .registry import FEATURE_LOSS_REGISTRY, feature_loss_from_config

__all__ = ["FeatureLossSum"]


class FeatureLossSum(nn.Module):
    """``sum_i w_i * loss_i(student, teacher)``, per image or for the batch.

    Every part receives the same (already adapted and resized) student and teacher maps and the
    same weight map, and returns float32; parts that ignore the weight map (PKD's statistics, a
    skipped SSIM level) behave here as they do alone.
    """

    def __init__(self, losses: Sequence[nn.Module], weights: Sequence[float], names=None):
        """
        Args:
            losses (sequence of nn.Module): feature losses with the registry's call signature.
            weights (sequence of float): one weight per loss.
            names (sequence of str or None): labels of the parts, for ``repr`` and messages.
        """
        super().__init__()
        if not losses:
            raise ValueError(
                "FeatureLossSum needs at least one loss (MODEL.KD.FEATURE_SUM.LOSSES)."
            )
        if len(weights) != len(losses):
            raise ValueError(
                f"{len(losses)} losses but {len(weights)} weights (MODEL.KD.FEATURE_SUM.WEIGHTS); "
                "give one weight per loss, or one for all."
            )
        self.parts = nn.ModuleList(losses)
        self.weights = tuple(float(w) for w in weights)
        self.names = tuple(names) if names is not None else tuple(type(m).__name__ for m in losses)

    @classmethod
    def from_config(cls, cfg):
        """Parts and weights from ``MODEL.KD.FEATURE_SUM``; ``feature_sum`` may not name
        itself."""
        fs = cfg.MODEL.KD.FEATURE_SUM
        names = list(fs.LOSSES)
        if any(n.lower() == "feature_sum" for n in names):
            raise ValueError(
                "MODEL.KD.FEATURE_SUM.LOSSES may not contain 'feature_sum' (it would recurse)."
            )
        weights = list(fs.WEIGHTS)
        if len(weights) == 1 and len(names) > 1:
            weights = weights * len(names)
        if not names:
            raise ValueError(
                "MODEL.KD.FEATURE.LOSS is 'feature_sum' but MODEL.KD.FEATURE_SUM.LOSSES is "
                'empty; name the registered losses to add, e.g. ["pkd", "ssim"], with WEIGHTS.'
            )
        losses = [feature_loss_from_config(cfg, n) for n in names]
        return dict(losses=losses, weights=weights, names=names)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {w}" for n, w in zip(self.names, self.weights))

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        weight_map: Optional[torch.Tensor] = None,
        per_image: bool = False,
    ) -> torch.Tensor:
        """
        Args:
            student (Tensor): ``(N, C, H, W)`` student map.
            teacher (Tensor): teacher map of the same shape.
            weight_map (Tensor or None): ``(N, 1, H, W)`` per-pixel weights, passed to every part.
            per_image (bool): ``(N,)`` values instead of the batch scalar.

        Returns:
            Tensor: float32 scalar (or ``(N,)``): the weighted sum of the parts' values.
        """
        total = None
        for loss, w in zip(self.parts, self.weights):
            value = loss(student, teacher, weight_map=weight_map, per_image=per_image).float()
            total = value * w if total is None else total + value * w
        return total


@FEATURE_LOSS_REGISTRY.register()
def feature_sum(cfg) -> FeatureLossSum:
    """``MODEL.KD.FEATURE.LOSS: feature_sum``: :class:`FeatureLossSum` from
    ``MODEL.KD.FEATURE_SUM``."""
    return FeatureLossSum(**FeatureLossSum.from_config(cfg))
