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

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from kd_det.engine.checkpoint import atomic_torch_save

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
    plain.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
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


def export_student(cfg, weights, output_dir, member=None):
    """Write ``output_dir/model_final.pth`` and ``output_dir/config.yaml`` for plain detectron2.

    Args:
        cfg (CfgNode): the training config (kd_det keys included).
        weights (str): the trained checkpoint (local path or URL).
        output_dir (str): where to write.
        member (str or None): for an ``OnlineDistillationRCNN`` config, the member to export
            (``peer<i>`` or ``ema<i>``; default ``MODEL.ONLINE_KD.INFERENCE``): its weights with
            the ``peers.<i>.`` / ``ema_peers.<i>.`` prefix stripped, and its own model config.

    Returns:
        dict: paths written and the number of dropped keys.

    Raises:
        RuntimeError: the exported weights do not exactly match a plain ``GeneralizedRCNN``.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = DetectionCheckpointer(torch.nn.Module()).path_manager.get_local_path(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint '{weights}' not found (--weights).")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model_state = ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt
    if cfg.MODEL.META_ARCHITECTURE == "OnlineDistillationRCNN":
        from kd_det.modeling.online_distillation import member_cfg, member_state_dict

        member = member or cfg.MODEL.ONLINE_KD.INFERENCE
        cfg = member_cfg(cfg, member)
        model_state = member_state_dict(model_state, member)
    elif member is not None:
        raise ValueError("--member only applies to OnlineDistillationRCNN configs.")
    state = student_state_dict(model_state)
    out_weights = os.path.join(output_dir, "model_final.pth")
    atomic_torch_save({"model": state}, out_weights)

    plain = plain_student_cfg(cfg, out_weights)
    out_cfg = os.path.join(output_dir, "config.yaml")
    with open(out_cfg, "w") as f:
        f.write(plain.dump())

    # Verify: a fresh plain detector takes every key, and every key it needs is there.
    check_cfg = cfg.clone()
    check_cfg.defrost()
    check_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    check_cfg.MODEL.DEVICE = "cpu"
    if "EFFICIENTNET" in check_cfg.MODEL:
        check_cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    model = build_model(check_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"Exported weights do not match a plain GeneralizedRCNN: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    dropped = len(model_state) - len(state)
    logger.info(f"Exported student to {output_dir} ({dropped} distillation keys dropped)")
    return {"weights": out_weights, "config": out_cfg, "dropped_keys": dropped}
