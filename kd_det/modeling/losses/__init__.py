"""Distillation losses shared by offline (``DistillationRCNN``) and online distillation.

* Feature hints between student and teacher maps, chosen by name from
  :data:`FEATURE_LOSS_REGISTRY`: importing this package registers the built-in losses under the
  names ``MODEL.KD.FEATURE.LOSS`` and ``MODEL.ONLINE_KD.FEATURE_LOSS`` accept (``ssim``, ``mse``,
  ``l1``, ``pkd``, ``cwd``, and ``feature_sum``, a weighted sum of others);
  :func:`feature_hint_per_image` applies one with adapter and resize.
* ROI terms (:func:`roi_kl_per_image`, :func:`roi_box_per_image`), RPN terms
  (:func:`rpn_per_image`) and dense-head terms (:func:`dense_cls_per_image`,
  :func:`dense_box_per_image`), computed per image.
* Reductions: per-pixel maps to per-image values (:func:`reduce_loss_map`), per-image values to
  the batch (:func:`masked_mean`).
"""

from .cwd import CWDFeatureLoss
from .lp import LpFeatureLoss
from .normalize import DEFAULT_SSIM_POLICY, POLICY_DATA_RANGE, RANGE_POLICIES, normalize_pair
from .pkd import PKDFeatureLoss, standardize_channels
from .reduce import attached_zero, check_pair, masked_mean, reduce_loss_map
from .roi import class_specific, log_probs, mean_log_probs, roi_box_per_image, roi_kl_per_image
from .rpn import rpn_per_image
from .dense import BOX_LOSSES, dense_box_per_image, dense_cls_per_image, foreground_anchors
from .hint import feature_hint_per_image, foreground_maps
from .registry import FEATURE_LOSS_REGISTRY, feature_loss_from_config
from .ssim import LOSS_FORMS, SMALL_MAP_RULES, SSIMFeatureLoss, gaussian_window, ssim_map
from .feature_sum import FeatureLossSum

__all__ = [
    "BOX_LOSSES",
    "CWDFeatureLoss",
    "DEFAULT_SSIM_POLICY",
    "FeatureLossSum",
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
    "class_specific",
    "dense_box_per_image",
    "dense_cls_per_image",
    "feature_hint_per_image",
    "feature_loss_from_config",
    "foreground_anchors",
    "foreground_maps",
    "gaussian_window",
    "log_probs",
    "masked_mean",
    "mean_log_probs",
    "normalize_pair",
    "reduce_loss_map",
    "roi_box_per_image",
    "roi_kl_per_image",
    "rpn_per_image",
    "ssim_map",
    "standardize_channels",
]
