"""Backbones registered in detectron2's BACKBONE_REGISTRY."""

from .efficientnet_lite import (  # noqa: F401
    EfficientNetLite,
    build_efficientnet_lite_backbone,
    build_efficientnet_lite_fpn_backbone,
    get_pretrained_weights_path,
)
