"""Export a trained student as a vanilla detectron2 Faster R-CNN (weights + config).

A kd_det checkpoint already holds the student under detectron2's own key names; export drops the
trainable distillation parts (``kd_adapters.``), writes ``model_final.pth`` and a ``config.yaml``
with ``META_ARCHITECTURE: GeneralizedRCNN`` and no kd_det-only keys, and then checks by loading both
into a fresh ``GeneralizedRCNN`` with no missing and no unexpected keys.

From an ``OnlineDistillationRCNN`` checkpoint, one member (``--member peer<i>`` or ``ema<i>``, an
EMA teacher) is exported: its keys without the ``peers.<i>.`` / ``ema_peers.<i>.`` prefix, and its
own model config with the training run's data and test settings.

The exported config loads with plain ``detectron2.config.get_cfg()`` whenever the backbone is one
of detectron2's. A student on a kd_det backbone (EfficientNet-Lite) keeps the
``MODEL.EFFICIENTNET`` section and needs ``import kd_det`` plus ``add_kd_config`` to load.
"""

import logging
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from kd_det.checkpoint import UnsafeFileError, load_checkpoint
from kd_det.engine.checkpoint import atomic_open
from kd_det.modeling.common import plain_architecture

logger = logging.getLogger(__name__)

#: State-dict prefixes that belong to distillation, not to the detector.
DISTILLATION_PREFIXES = ("kd_adapters.", "kd_hint_weights.")
#: Config sections of kd_det that a kd_det backbone needs at build time.
BACKBONE_SECTIONS = {"build_efficientnet_lite_backbone": "EFFICIENTNET",
                     "build_efficientnet_lite_fpn_backbone": "EFFICIENTNET"}  # fmt: skip


def _plain_subset(cfg, reference):
    """Copy of ``cfg`` restricted to the keys ``reference`` (detectron2's defaults) has."""
    out = CfgNode()
    for k, v in cfg.items():
        if k not in reference:
            continue
        if isinstance(v, CfgNode) and isinstance(reference[k], CfgNode):
            out[k] = _plain_subset(v, reference[k])
        else:
            out[k] = v
    return out


def plain_student_cfg(cfg, weights):
    """The student's config as a plain detectron2 config pointing at ``weights``."""
    plain = _plain_subset(cfg, get_cfg())
    plain.MODEL.META_ARCHITECTURE = plain_architecture(cfg.MODEL.META_ARCHITECTURE)
    plain.MODEL.WEIGHTS = weights
    section = BACKBONE_SECTIONS.get(cfg.MODEL.BACKBONE.NAME)
    if section:
        plain.MODEL[section] = cfg.MODEL[section].clone()
        if "PRETRAINED" in plain.MODEL[section]:
            plain.MODEL[section].PRETRAINED = False  # the exported weights replace ImageNet's
    return plain


def student_state_dict(checkpoint_model):
    """Drop distillation-only keys from a checkpoint's ``model`` dict."""
    return {k: v for k, v in checkpoint_model.items() if not k.startswith(DISTILLATION_PREFIXES)}


class ExportError(RuntimeError):
    """An export refused before anything was written (bad output, unreadable or mismatching
    weights)."""


def check_output_dir(output_dir):
    """Create ``output_dir`` if needed and prove it is writable, before any expensive work.

    Raises:
        ExportError: the directory cannot be created or written to.
    """
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ExportError(
            f"Cannot write to --output '{output_dir}' ({e.strerror or e}). Choose a directory you "
            "can create and write to."
        ) from e


def _mismatches(model, state):
    """Missing keys, unexpected keys and shape mismatches of ``state`` against ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, shapes


def export_student(cfg, weights, output_dir, member=None, config_file=None):
    """Write ``output_dir/model_final.pth`` and ``output_dir/config.yaml`` for plain detectron2.

    Everything is checked before anything is written: the output directory is writable, the
    checkpoint loads, and a fresh plain ``GeneralizedRCNN`` built from the config takes every
    key with its shape. Only then are both files written, each to a temporary file that replaces
    the target once complete, so a failed export never damages an earlier good export in the same
    directory (a Lite0 config beside R-18 weights, say).

    Args:
        cfg (CfgNode): the training config (kd_det keys included).
        weights (str): the trained checkpoint (local path or URL).
        output_dir (str): where to write.
        member (str or None): for an ``OnlineDistillationRCNN`` config, the member to export
            (``peer<i>`` or ``ema<i>``; default ``MODEL.ONLINE_KD.INFERENCE``): its weights with
            the ``peers.<i>.`` / ``ema_peers.<i>.`` prefix stripped, and its own model config.
        config_file (str or None): the config file ``cfg`` came from, named in error messages.

    Returns:
        dict: paths written and the number of dropped keys.

    Raises:
        ExportError: unwritable ``output_dir``, unreadable checkpoint, or weights that do not
            exactly match a plain ``GeneralizedRCNN`` of this config (nothing is written).
        FileNotFoundError: ``weights`` does not exist.
    """
    check_output_dir(output_dir)
    cfg_name = config_file or "the given config"
    path = DetectionCheckpointer(torch.nn.Module()).path_manager.get_local_path(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint '{weights}' not found (--weights).")
    try:
        ckpt = load_checkpoint(path)  # weights_only: a crafted file's code never runs
    except UnsafeFileError as e:
        raise ExportError(f"--weights: {e} Nothing was written to '{output_dir}'.") from None
    except Exception as e:
        raise ExportError(
            f"Checkpoint '{weights}' cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it is truncated or not a PyTorch file. "
            f"Nothing was written to '{output_dir}'."
        ) from e
    model_state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if cfg.MODEL.META_ARCHITECTURE == "OnlineDistillationRCNN":
        from .members import member_cfg, member_state_dict

        member = member or cfg.MODEL.ONLINE_KD.INFERENCE
        cfg = member_cfg(cfg, member)
        model_state = member_state_dict(model_state, member)
    elif member is not None:
        raise ValueError("--member only applies to OnlineDistillationRCNN configs.")
    state = student_state_dict(model_state)

    # Check first: a fresh plain detector takes every key, and every key it needs is there.
    check_cfg = cfg.clone()
    check_cfg.defrost()
    check_cfg.MODEL.META_ARCHITECTURE = plain_architecture(cfg.MODEL.META_ARCHITECTURE)
    check_cfg.MODEL.DEVICE = "cpu"
    if "EFFICIENTNET" in check_cfg.MODEL:
        check_cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    # The weights come from the checkpoint: saying so keeps the backbone builder from warning that
    # FrozenBN without ImageNet weights normalizes nothing (it would, for a fresh model).
    check_cfg.MODEL.WEIGHTS = weights
    missing, unexpected, shapes = _mismatches(build_model(check_cfg), state)
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches, e.g. " + "; ".join(shapes[:4]))
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. " + ", ".join(missing[:6]))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. " + ", ".join(unexpected[:6]))
        raise ExportError(
            f"Checkpoint '{weights}' does not match config '{cfg_name}': "
            + " | ".join(parts)
            + f". Nothing was written to '{output_dir}'. Export with the config (and overrides) "
            "the checkpoint was trained with."
        )

    # Then write: both files complete in temporary files before either replaces its target.
    out_weights = os.path.join(output_dir, "model_final.pth")
    out_cfg = os.path.join(output_dir, "config.yaml")
    plain = plain_student_cfg(cfg, out_weights)
    with atomic_open(out_cfg, "w") as f_cfg:
        f_cfg.write(plain.dump())
        with atomic_open(out_weights, "wb") as f_weights:
            torch.save({"model": state}, f_weights)
    dropped = len(model_state) - len(state)
    logger.info(f"Exported student to {output_dir} ({dropped} distillation keys dropped)")
    return {"weights": out_weights, "config": out_cfg, "dropped_keys": dropped}
