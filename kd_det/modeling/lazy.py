"""LazyConfig models as teachers and as students.

detectron2's modern configs (the ``new_baselines`` model zoo, ViTDet, MViTv2, detrex) are
LazyConfig Python files whose ``model`` is a recipe, ``L(GeneralizedRCNN)(backbone=..., ...)``,
that ``instantiate`` turns into the module. kd_det uses them two ways:

* **A LazyConfig teacher.** ``MODEL.KD.TEACHER.CONFIG_FILE`` names a ``.py`` file (or
  ``model_zoo:new_baselines/....py``); ``MODEL.KD.TEACHER.OPTS`` are LazyConfig overrides
  (``"model.roi_heads.num_classes=12"``). What kd_det reads from a teacher's config besides the
  model (its class, input format, class count and training datasets) is copied into a yacs
  *summary* (:func:`lazy_teacher_cfg`), so the checks written for YAML teachers (label space,
  class names, input formats) apply unchanged; :func:`build_sub_model` instantiates the model.
* **A LazyConfig student.** :func:`distill` turns the student's ``model`` recipe into the recipe
  of the distillation model of its family (``DistillationRCNN`` for a ``GeneralizedRCNN``,
  ``DistillationRetinaNet`` for a ``RetinaNet``) with the ``MODEL.KD`` settings given as a dict;
  ``tools/lazyconfig_train_net.py`` trains it like any LazyConfig.

A ``.py`` config is code: loading it runs it. Give only files you trust, as you would any script
you run. YAML configs never run code (:mod:`kd_det.config`).
"""

import copy
import os

from detectron2.config import CfgNode

__all__ = [
    "LAZY_SUFFIX",
    "build_sub_model",
    "distill",
    "distillation_model",
    "is_lazy_config",
    "kd_cfg",
    "lazy_teacher_cfg",
    "load_lazy_config",
    "recipe_kd_cfg",
]

#: Config files with this suffix are LazyConfig Python files.
LAZY_SUFFIX = ".py"

#: The plain detectron2 classes whose LazyConfig recipes :func:`distill` wraps.
_FAMILIES = {
    "GeneralizedRCNN": "DistillationRCNN",
    "RetinaNet": "DistillationRetinaNet",
}


def is_lazy_config(path):
    """Whether ``path`` names a LazyConfig Python file."""
    return str(path).endswith(LAZY_SUFFIX)


def load_lazy_config(path, overrides=(), key="MODEL.KD.TEACHER.CONFIG_FILE"):
    """``LazyConfig.load(path)`` with ``overrides`` ("a.b=value") applied; it must have a
    ``model``.

    Raises:
        FileNotFoundError: no such file (``key`` names the config key that gave it).
        ValueError: the file defines no ``model``.
    """
    from detectron2.config import LazyConfig

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LazyConfig file '{path}' ({key}) does not exist. Paths are relative to the working "
            "directory; run from the repository root or give an absolute path."
        )
    cfg = LazyConfig.load(path)
    if "model" not in cfg:
        raise ValueError(f"LazyConfig file '{path}' ({key}) defines no `model`.")
    return LazyConfig.apply_overrides(cfg, list(overrides))


def _target_name(node):
    """The class name of a recipe's ``_target_`` (a class, a function or a dotted path)."""
    target = node.get("_target_")
    if isinstance(target, str):
        return target.rsplit(".", 1)[-1]
    return getattr(target, "__name__", str(target))


def lazy_teacher_cfg(path, cfg):
    """The yacs summary of a LazyConfig teacher (module docstring), frozen.

    Args:
        path (str): the ``.py`` file (model-zoo prefix already resolved).
        cfg (CfgNode): the student's config (``MODEL.KD.TEACHER.OPTS``, ``MODEL.DEVICE``).

    Returns:
        CfgNode: kd_det's default config with ``MODEL.META_ARCHITECTURE``, ``INPUT.FORMAT``,
        ``MODEL.ROI_HEADS.NUM_CLASSES`` / ``MODEL.RETINANET.NUM_CLASSES``, ``DATASETS.TRAIN`` and
        ``MODEL.DEVICE`` of the teacher, and ``LAZY.FILE`` / ``LAZY.OPTS`` to build it from.
    """
    from omegaconf import OmegaConf

    from kd_det.config import get_kd_cfg

    from .common import DISTILLATION_ARCHITECTURES

    opts = list(cfg.MODEL.KD.TEACHER.OPTS)
    lcfg = load_lazy_config(path, opts)
    model = lcfg.model
    arch = _target_name(model)
    if arch in DISTILLATION_ARCHITECTURES or arch == distillation_model.__name__:
        raise ValueError(
            f"Teacher config file '{path}' is itself a distillation model ({arch}); point "
            "MODEL.KD.TEACHER.CONFIG_FILE at the plain detector config the teacher was trained "
            "with."
        )
    summary = get_kd_cfg()
    summary.MODEL.META_ARCHITECTURE = arch
    summary.MODEL.DEVICE = cfg.MODEL.DEVICE
    summary.INPUT.FORMAT = model.get("input_format", "BGR")
    classes = OmegaConf.select(model, "num_classes", default=None)
    if classes is None:
        classes = OmegaConf.select(model, "roi_heads.num_classes", default=None)
    if classes is not None:
        summary.MODEL.ROI_HEADS.NUM_CLASSES = int(classes)
        summary.MODEL.RETINANET.NUM_CLASSES = int(classes)
    names = OmegaConf.select(lcfg, "dataloader.train.dataset.names", default=None)
    if names is not None:
        summary.DATASETS.TRAIN = (names,) if isinstance(names, str) else tuple(names)
    summary.MODEL.WEIGHTS = cfg.MODEL.KD.TEACHER.WEIGHTS
    summary.LAZY = CfgNode({"FILE": path, "OPTS": opts})
    summary.freeze()
    return summary


def build_sub_model(tcfg):
    """A teacher's model from its config: ``build_model`` for yacs, ``instantiate`` of the
    LazyConfig's ``model`` for a :func:`lazy_teacher_cfg` summary; on ``MODEL.DEVICE``."""
    from detectron2.modeling import build_model

    if "LAZY" not in tcfg:
        return build_model(tcfg)
    from detectron2.config import instantiate

    model = instantiate(load_lazy_config(tcfg.LAZY.FILE, tcfg.LAZY.OPTS).model)
    return model.to(tcfg.MODEL.DEVICE)


def distill(model, kd, datasets=()):
    """The LazyConfig recipe of the distillation model whose student is ``model``.

    Usage in a LazyConfig file (``configs/Synthetic/lazy/distill_retinanet_R18_mse.py``)::

        from kd_det.modeling.lazy import distill
        from .retinanet_R18_FPN import dataloader, model, optimizer, train  # the student

        model = distill(model, kd={
            "TEACHER": {"CONFIG_FILE": "teacher.yaml", "WEIGHTS": "teacher.pth"},
            "FEATURE": {"LOSS": "mse", "LEVELS": ["p3", "p4", "p5", "p6", "p7"]},
        }, datasets=["synthetic_train"])

    Args:
        model: a recipe ``L(GeneralizedRCNN)(...)`` or ``L(RetinaNet)(...)`` (not modified).
        kd (dict): ``MODEL.KD`` settings, nested like the YAML keys (``{"FEATURE": {...}}``);
            every key of ``kd_det/config/defaults.py`` is accepted, a wrong one fails at build.
            Overridable on the command line: ``model.kd.FEATURE.LOSS=pkd``.
        datasets (list[str]): the student's training datasets (the teacher's classes are
            checked against theirs, as ``DATASETS.TRAIN`` does for YAML students).

    Returns:
        The recipe (a ``DictConfig``) of ``DistillationRCNN`` / ``DistillationRetinaNet``.

    Raises:
        ValueError: ``model`` is not a plain ``GeneralizedRCNN`` or ``RetinaNet`` recipe.
    """
    arch = _target_name(model)
    if arch not in _FAMILIES:
        raise ValueError(
            f"distill() wraps the recipe of a GeneralizedRCNN or a RetinaNet; got {arch}. A "
            "LazyConfig model of another class can still be a teacher (feature terms)."
        )
    node = copy.deepcopy(model)
    node._target_ = distillation_model
    node.kd_architecture = _FAMILIES[arch]
    node.kd = dict(kd)
    node.kd_datasets = list(datasets)
    return node


def distillation_model(*, kd_architecture, kd, kd_datasets=(), **student):
    """Build ``kd_architecture`` from the student's instantiated arguments and the ``MODEL.KD``
    settings ``kd`` (the target of :func:`distill`'s recipe)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from kd_det.config import validate_kd_config

    cfg = kd_cfg(kd_architecture, kd, kd_datasets, student)
    validate_kd_config(cfg)
    cls = META_ARCH_REGISTRY.get(kd_architecture)
    return cls(**student, **cls.kd_arguments(cfg))


def kd_cfg(kd_architecture, kd, kd_datasets, student):
    """The yacs config that the checks written for YAML students read, for a :func:`distill`
    model: its ``MODEL.KD``, architecture, training datasets, input format and class count.

    Args:
        kd_architecture, kd, kd_datasets: the fields of :func:`distill`'s recipe.
        student: the student's arguments, instantiated or still a recipe (only
            ``input_format``, ``roi_heads.num_classes`` and ``num_classes`` are read).
    """
    from omegaconf import DictConfig, OmegaConf

    from kd_det.config import get_kd_cfg

    if isinstance(kd, DictConfig):
        kd = OmegaConf.to_container(kd, resolve=True)
    cfg = get_kd_cfg()
    cfg.MODEL.KD.merge_from_other_cfg(CfgNode(kd))  # a key that does not exist fails here
    cfg.MODEL.META_ARCHITECTURE = kd_architecture
    cfg.DATASETS.TRAIN = tuple(kd_datasets)
    cfg.INPUT.FORMAT = student.get("input_format", "BGR")
    if "roi_heads" in student:  # the student's classes, for the label-space checks
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = student["roi_heads"].num_classes
    if "num_classes" in student:
        cfg.MODEL.RETINANET.NUM_CLASSES = student["num_classes"]
    # The teacher is built on the CPU and follows the student to its device at the first step
    # (TeacherHolder); LazyConfig students are moved by their training script.
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def recipe_kd_cfg(recipe):
    """:func:`kd_cfg` of a :func:`distill` recipe (a ``DictConfig``), or None when ``recipe`` is
    not one (a plain LazyConfig model has no teacher to check)."""
    if _target_name(recipe) != "distillation_model":
        return None
    fields = ("kd_architecture", "kd", "kd_datasets")
    student = {k: v for k, v in recipe.items() if k not in fields and k != "_target_"}
    return kd_cfg(recipe.kd_architecture, recipe.kd, recipe.get("kd_datasets", ()), student)
