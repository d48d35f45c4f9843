"""Building, loading and holding a frozen teacher detector.

The most common failure reported against KD toolkits is a teacher whose weights were silently not
loaded: training runs, the "distilled" student equals the baseline, and nobody notices. Here a
teacher either loads completely -- every parameter and buffer its config needs, with the right
shapes -- or training stops before the first step with the file and the keys named.

The teacher is held by :class:`TeacherHolder`, a plain object rather than an ``nn.Module``
attribute, so it never appears in the student's ``state_dict()``, ``parameters()`` (hence the
optimizer), DistributedDataParallel or ``model.train()``.
"""

import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import nn

logger = logging.getLogger(__name__)


#: ``MODEL.KD.TEACHER.CONFIG_FILE`` values with this prefix name a detectron2 model-zoo config.
MODEL_ZOO_PREFIX = "model_zoo:"


class TeacherLoadError(RuntimeError):
    """The teacher's weights are missing or do not match its config."""


def build_teacher_cfg(cfg):
    """The teacher's config: its own file, ``MODEL.KD.TEACHER.OPTS``, the student's device.

    Raises:
        FileNotFoundError: ``MODEL.KD.TEACHER.CONFIG_FILE`` is empty or missing.
    """
    from kd_det.config import get_kd_cfg

    path = cfg.MODEL.KD.TEACHER.CONFIG_FILE
    if path.startswith(MODEL_ZOO_PREFIX):
        # A config shipped inside detectron2's package, e.g. the model-zoo R101-FPN 3x teacher.
        from detectron2 import model_zoo

        path = model_zoo.get_config_file(path[len(MODEL_ZOO_PREFIX) :])
    if not path:
        raise FileNotFoundError(
            "MODEL.KD.TEACHER.CONFIG_FILE is empty. Point it at the teacher's config file "
            "(e.g. configs/Synthetic/faster_rcnn_lite2_FPN.yaml)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Teacher config file '{path}' (MODEL.KD.TEACHER.CONFIG_FILE) does not exist. Paths "
            "are relative to the working directory; run from the repository root or give an "
            "absolute path."
        )
    tcfg = get_kd_cfg()
    tcfg.merge_from_file(path)
    tcfg.merge_from_list(list(cfg.MODEL.KD.TEACHER.OPTS))
    if tcfg.MODEL.META_ARCHITECTURE in ("DistillationRCNN", "OnlineDistillationRCNN"):
        raise ValueError(
            f"The teacher config '{path}' is itself a distillation model "
            f"({tcfg.MODEL.META_ARCHITECTURE}); point MODEL.KD.TEACHER.CONFIG_FILE at the plain "
            "detector config the teacher was trained with."
        )
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = cfg.MODEL.KD.TEACHER.WEIGHTS
    # ImageNet initialisation of the teacher's backbone is pointless: its checkpoint overwrites it.
    if "EFFICIENTNET" in tcfg.MODEL:
        tcfg.MODEL.EFFICIENTNET.PRETRAINED = False
    tcfg.freeze()
    return tcfg


class _RecordingCheckpointer(DetectionCheckpointer):
    """Keeps the incompatible-keys report that the parent only logs."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_teacher_weights(model, weights):
    """Load ``weights`` into ``model`` strictly; raise :class:`TeacherLoadError` on any gap.

    Uses detectron2's checkpointer (so ``detectron2://`` URLs, model-zoo ``.pkl`` files and Caffe2
    names work) but, unlike its ``load``, refuses missing keys and shape mismatches instead of only
    logging them.
    """
    checkpointer = _RecordingCheckpointer(model)
    local = checkpointer.path_manager.get_local_path(weights)
    if not os.path.isfile(local):
        raise TeacherLoadError(
            f"Teacher weights '{weights}' (MODEL.KD.TEACHER.WEIGHTS) not found. Train the teacher "
            "first (tools/train_net.py --config-file <teacher config>) and point "
            "MODEL.KD.TEACHER.WEIGHTS at its model_final.pth."
        )
    try:
        checkpointer.load(weights, checkpointables=[])
    except Exception as e:
        raise TeacherLoadError(f"Teacher weights '{weights}' could not be read: {e!r}") from e
    incompatible = checkpointer.incompatible
    missing = list(incompatible.missing_keys)
    shapes = [
        f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
        for k, a, b in incompatible.incorrect_shapes
    ]
    if missing or shapes:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing keys, e.g. " + ", ".join(missing[:8]))
        if shapes:
            lines.append(f"{len(shapes)} shape mismatches, e.g. " + "; ".join(shapes[:4]))
        raise TeacherLoadError(
            f"Teacher weights '{weights}' do not match the teacher config: "
            + " | ".join(lines)
            + ". Check that MODEL.KD.TEACHER.CONFIG_FILE is the config the teacher was trained "
            "with (backbone, FPN channels, NUM_CLASSES)."
        )
    if incompatible.unexpected_keys:
        logger.info(
            f"Teacher checkpoint has {len(incompatible.unexpected_keys)} keys the teacher does "
            f"not use (ignored), e.g. {incompatible.unexpected_keys[:4]}"
        )


def freeze(model):
    """No gradients, eval mode: BatchNorm uses its running statistics and never updates them."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def build_teacher(cfg):
    """Build the frozen teacher described by ``cfg.MODEL.KD.TEACHER``.

    Returns:
        tuple(nn.Module, CfgNode): the teacher in eval mode on the student's device, and its config.
    """
    tcfg = build_teacher_cfg(cfg)
    weights = cfg.MODEL.KD.TEACHER.WEIGHTS
    if not weights and not cfg.MODEL.KD.TEACHER.ALLOW_RANDOM:
        raise TeacherLoadError(
            "MODEL.KD.TEACHER.WEIGHTS is empty: distillation needs a trained teacher. Set it to "
            "the teacher's checkpoint (local path or detectron2:// URL). For cost benchmarks only, "
            "MODEL.KD.TEACHER.ALLOW_RANDOM True accepts a random teacher."
        )
    model = build_model(tcfg)
    if weights:
        load_teacher_weights(model, weights)
        logger.info(f"Loaded teacher weights from {weights}")
    else:
        logger.warning("MODEL.KD.TEACHER.ALLOW_RANDOM: the teacher has RANDOM weights.")
    return freeze(model), tcfg


class TeacherHolder:
    """Keeps the teacher outside the student's module tree (see the module docstring).

    ``get(device)`` returns the teacher on ``device``, in eval mode: whatever happened to it (a
    ``.train()`` call by user code, the student moved to another device) is undone before each use.
    """

    def __init__(self, model):
        self.model = model

    def get(self, device):
        model = self.model
        p = next(model.parameters(), None)
        if p is not None and p.device != torch.device(device):
            model.to(device)
        if model.training:
            model.eval()
        return model


class TeacherInference(nn.Module):
    """Runs the teacher on inputs prepared for the student (for evaluating the teacher with the
    student's data loader and evaluator): flips RGB<->BGR when the two formats differ."""

    def __init__(self, teacher, student_format, teacher_format):
        super().__init__()
        self.teacher = teacher
        if student_format != teacher_format and {student_format, teacher_format} != {"RGB", "BGR"}:
            raise ValueError(
                f"Cannot feed {student_format} images to a teacher that expects {teacher_format}."
            )
        self.flip = student_format != teacher_format

    def forward(self, batched_inputs):
        if self.flip:
            batched_inputs = [dict(x, image=x["image"].flip(0)) for x in batched_inputs]
        return self.teacher(batched_inputs)
