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
from torch import nn

from kd_det.checkpoint import SafeDetectionCheckpointer, UnsafeFileError

from .common import build_sub_model_cfg, check_convertible, convert_input_format
from .lazy import build_sub_model, is_lazy_config, lazy_teacher_cfg

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
    if is_lazy_config(path):  # a LazyConfig .py file: Python code the user chose to run
        return lazy_teacher_cfg(path, cfg)
    tcfg = build_sub_model_cfg(
        path,
        cfg.MODEL.KD.TEACHER.OPTS,
        cfg.MODEL.DEVICE,
        what="Teacher config file",
        key="MODEL.KD.TEACHER.CONFIG_FILE",
        not_plain_hint="point MODEL.KD.TEACHER.CONFIG_FILE at the plain detector config the "
        "teacher was trained with.",
    )
    tcfg.MODEL.WEIGHTS = cfg.MODEL.KD.TEACHER.WEIGHTS
    # ImageNet initialisation of the teacher's backbone is pointless: its checkpoint overwrites it.
    if "EFFICIENTNET" in tcfg.MODEL:
        tcfg.MODEL.EFFICIENTNET.PRETRAINED = False
    tcfg.freeze()
    return tcfg


class _RecordingCheckpointer(SafeDetectionCheckpointer):
    """Keeps the incompatible-keys report that the parent only logs (and reads files as data)."""

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
    except UnsafeFileError as e:  # names the file and why; a traceback of it adds nothing
        raise TeacherLoadError(f"Teacher weights (MODEL.KD.TEACHER.WEIGHTS): {e}") from None
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
    if weights:
        check_teacher_classes(cfg, tcfg)
    model = build_sub_model(tcfg)
    if weights:
        load_teacher_weights(model, weights)
        logger.info(f"Loaded teacher weights from {weights}")
    else:
        logger.warning("MODEL.KD.TEACHER.ALLOW_RANDOM: the teacher has RANDOM weights.")
    return freeze(model), tcfg


def teacher_data_cfg(cfg, tcfg):
    """The config that tells what data the teacher was trained on.

    A teacher is often trained with ``KEY VALUE`` overrides (``DATASETS.COCO``,
    ``DATASETS.TRAIN``) that its config file does not contain. detectron2's ``default_setup``
    writes the merged config as ``config.yaml`` into the run's ``OUTPUT_DIR``, next to
    ``model_final.pth``: when the teacher's weights are a local file with that record beside them,
    its ``DATASETS`` section is used; otherwise the teacher config's own.
    """
    from detectron2.config import CfgNode

    weights = cfg.MODEL.KD.TEACHER.WEIGHTS
    run_cfg = os.path.join(os.path.dirname(weights), "config.yaml") if weights else ""
    if run_cfg and os.path.isfile(weights) and os.path.isfile(run_cfg):
        import yaml

        with open(run_cfg) as f:
            data = (yaml.safe_load(f) or {}).get("DATASETS") or {}
        if data.get("TRAIN"):
            return CfgNode(
                {"DATASETS": {"TRAIN": list(data["TRAIN"]), "COCO": data.get("COCO") or []}}
            )
    return tcfg


def check_teacher_classes(cfg, tcfg):
    """Refuse a teacher trained on other classes (or another label order) than the student's
    data when a term reads its class outputs; warn when only label-free terms are used.

    A teacher with the wrong label order loads cleanly and produces confident, wrong class
    targets: the "distilled" student gets worse and nothing says why. Class names come from
    :func:`teacher_data_cfg` and the student's ``DATASETS.TRAIN``; when either is unknown (e.g. a
    dataset registered by user code the teacher config does not name) nothing is checked.

    Returns:
        bool: False when the classes differ (then the teacher's AP cannot be checked either).

    Raises:
        ValueError: the classes differ and ``MODEL.KD.ROI.CLS_WEIGHT`` or ``BOX_WEIGHT`` is set.
    """
    from kd_det.data.builtin import compare_teacher_classes

    diff = compare_teacher_classes(cfg, teacher_data_cfg(cfg, tcfg))
    if diff is None:
        return True
    where = (
        "Class names are read from the config.yaml next to MODEL.KD.TEACHER.WEIGHTS (written by "
        "the teacher's training run) or else from MODEL.KD.TEACHER.CONFIG_FILE's DATASETS.TRAIN; "
        "if that names other data than the teacher was trained on, fix it with "
        "MODEL.KD.TEACHER.OPTS."
    )
    labelled = label_terms(cfg)
    if labelled:
        raise ValueError(
            f"The teacher's classes differ from the student's: {diff}. {' and '.join(labelled)} "
            "read the teacher's outputs by label index, so they would teach wrong labels. Fix: "
            "distill from a teacher trained on the student's categories in the same id order, or "
            f"keep only label-free terms ({' '.join(k + ' 0' for k in labelled)}). {where}"
        )
    logger.warning(
        f"The teacher's classes differ from the student's: {diff}. Only label-free terms "
        f"(feature, RPN) are used, so distillation proceeds; the teacher's AP is not checked. "
        f"{where}"
    )
    return False


#: Terms that read the teacher's outputs by label index (refused across label spaces).
LABEL_KEYS = (
    "MODEL.KD.ROI.CLS_WEIGHT",
    "MODEL.KD.ROI.BOX_WEIGHT",
    "MODEL.KD.DENSE.CLS_WEIGHT",
    "MODEL.KD.CROSSKD.CLS_WEIGHT",
)


def label_terms(cfg):
    """The keys of :data:`LABEL_KEYS` that ``cfg`` switches on."""
    out = []
    for key in LABEL_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
        if node:
            out.append(key)
    return out


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
        check_convertible(student_format, teacher_format, "the teacher")
        self.teacher = teacher
        self.student_format = student_format
        self.teacher_format = teacher_format

    def forward(self, batched_inputs):
        inputs = convert_input_format(batched_inputs, self.student_format, self.teacher_format)
        return self.teacher(inputs)


def check_label_space(cfg, tcfg):
    """Refuse logit distillation between different label spaces, before training starts."""
    s_k, t_k = cfg.MODEL.ROI_HEADS.NUM_CLASSES, tcfg.MODEL.ROI_HEADS.NUM_CLASSES
    if s_k != t_k:
        raise ValueError(
            f"The teacher predicts {t_k} classes and the student {s_k}: ROI logit distillation "
            "(MODEL.KD.ROI.CLS_WEIGHT / BOX_WEIGHT) needs the same label space. Set both to 0 to "
            "distill features only, or use a teacher trained on the student's classes."
        )
    s_names = _thing_classes(cfg.DATASETS.TRAIN)
    t_names = _thing_classes(tcfg.DATASETS.TRAIN)
    if s_names and t_names and s_names != t_names:
        raise ValueError(
            "The teacher's training classes differ from the student's (same count, different "
            f"names/order: {t_names[:5]}... vs {s_names[:5]}...): ROI logit distillation would "
            "match the wrong classes. Set MODEL.KD.ROI.*_WEIGHT to 0 or retrain the teacher."
        )


def _thing_classes(names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in names:
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if hasattr(meta, "thing_classes"):
                return list(meta.thing_classes)
    return None
