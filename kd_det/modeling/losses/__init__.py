"""Feature-hint losses between student and teacher feature maps, chosen by name from a registry.

Importing this package registers the built-in losses under the names ``MODEL.KD.FEATURE.LOSS``
and ``MODEL.ONLINE_KD.FEATURE_LOSS`` accept: ``ssim``, ``mse``, ``l1``, ``pkd`` and ``cwd``.
"""

from .cwd import CWDFeatureLoss
from .lp import LpFeatureLoss
from .normalize import DEFAULT_SSIM_POLICY, POLICY_DATA_RANGE, RANGE_POLICIES, normalize_pair
from .pkd import PKDFeatureLoss, standardize_channels
from .reduce import attached_zero, check_pair, reduce_loss_map
from .registry import FEATURE_LOSS_REGISTRY, feature_loss_from_config
from .ssim import LOSS_FORMS, SMALL_MAP_RULES, SSIMFeatureLoss, gaussian_window, ssim_map

__all__ = [
    "CWDFeatureLoss",
    "DEFAULT_SSIM_POLICY",
    "FEATURE_LOSS_REGISTRY",
    "LOSS_FORMS",
    "LpFeatureLoss",
    "PKDFeatureLoss",
    "POLICY_DATA_RANGE",
    "RANGE_POLICIES",
    "SMALL_MAP_RULES",
    "SSIMFeatureLoss",
    "attached_zero",
    "check_pair",
    "feature_loss_from_config",
    "gaussian_window",
    "normalize_pair",
    "reduce_loss_map",
    "ssim_map",
    "standardize_channels",
]
