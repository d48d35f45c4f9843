"""Pieces every distillation meta-architecture shares: sub-model configs, input formats,
per-level weights, channel adapters and the warm-up rule.

A teacher (offline) and the peers (online) are both complete detectors described by their own
config file plus ``KEY VALUE`` overrides; the student's data loader feeds all of them, so images
are converted to each sub-model's ``INPUT.FORMAT``.
"""

import os

from detectron2.utils.events import get_event_storage
from torch import nn

__all__ = [
    "DISTILLATION_ARCHITECTURES",
    "build_adapter",
    "build_sub_model_cfg",
    "check_convertible",
    "convert_input_format",
    "linear_warmup",
    "per_level_weights",
]

#: Meta-architectures that cannot serve as a teacher or peer (they are not plain detectors).
DISTILLATION_ARCHITECTURES = ("DistillationRCNN", "OnlineDistillationRCNN")


def build_sub_model_cfg(path, opts, device, *, what, key, not_plain_hint):
    """A sub-model's (teacher's or peer's) config: its file, ``opts``, the run's device.

    The returned config is not frozen: the caller adds what is specific to its role.

    Args:
        path (str): the sub-model's config file.
        opts (list[str]): ``KEY VALUE`` overrides.
        device (str): the run's ``MODEL.DEVICE``.
        what (str): how error messages name the file, e.g. "Teacher config file".
        key (str): the config key that named the file.
        not_plain_hint (str): what to do when the file is a distillation config.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file describes a distillation model, not a plain detector.
    """
    from kd_det.config import get_kd_cfg

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} '{path}' ({key}) does not exist. Paths are relative to the working directory;"
            " run from the repository root or give an absolute path."
        )
    sub = get_kd_cfg()
    sub.merge_from_file(path)
    sub.merge_from_list(list(opts))
    if sub.MODEL.META_ARCHITECTURE in DISTILLATION_ARCHITECTURES:
        raise ValueError(
            f"{what} '{path}' is itself a distillation model ({sub.MODEL.META_ARCHITECTURE}); "
            f"{not_plain_hint}"
        )
    sub.MODEL.DEVICE = device
    return sub


def check_convertible(src, dst, who):
    """Raise ``ValueError`` unless images in ``src`` format can be fed to ``who`` expecting
    ``dst`` (the same format, or RGB<->BGR)."""
    if src != dst and {src, dst} != {"RGB", "BGR"}:
        raise ValueError(
            f"The data gives {src} images and {who} expects {dst}; only RGB<->BGR can be "
            "converted. Train it with the data's INPUT.FORMAT."
        )


def convert_input_format(batched_inputs, src, dst):
    """``batched_inputs`` with every ``image`` converted from ``src`` to ``dst`` format.

    Only RGB<->BGR (a channel flip) is supported (see :func:`check_convertible`); the same format
    returns the list itself.
    """
    if src == dst:
        return batched_inputs
    check_convertible(src, dst, "the model")
    return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]


def per_level_weights(weights, levels, key):
    """``{level: weight}``: a one-element weight list broadcast to ``levels``, or one per level.

    Raises:
        ValueError: the counts differ (``key`` names the config key).
    """
    weights = [float(w) for w in weights]
    if len(levels) == 0:
        return {}
    if len(weights) == 1:
        weights = weights * len(levels)
    if len(weights) != len(levels):
        raise ValueError(
            f"{key} has {len(weights)} values for {len(levels)} levels {list(levels)}; give one "
            "value for all levels or one per level."
        )
    return dict(zip(levels, weights))


def build_adapter(in_channels, out_channels):
    """A 1x1 conv from the student's to the target's channels (Kaiming-uniform, zero bias)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


def linear_warmup(warmup_iters, iteration=None):
    """The warm-up factor of distillation weights at ``iteration`` (default: the current one).

    ``min(1, (iteration + 1) / warmup_iters)``: the one rule of ``MODEL.KD.WARMUP_ITERS`` and
    ``MODEL.ONLINE_KD.MUTUAL_WARMUP``. Iteration 0 already trains with ``1 / warmup_iters`` of the
    weight (no step computes a term only to multiply it by zero), and iteration
    ``warmup_iters - 1``, the last of the warm-up, with the full weight. ``warmup_iters <= 0``
    disables the warm-up.
    """
    if warmup_iters <= 0:
        return 1.0
    if iteration is None:
        iteration = get_event_storage().iter
    return min(1.0, (iteration + 1) / warmup_iters)


def check_box_heads(model, who, fix):
    """Raise unless ``model``'s ROI heads support ROI distillation: ``StandardROIHeads``-style box
    heads (their ``box_pooler``/``box_head``/``box_predictor`` score another model's proposals),
    box-only, not trained on predicted boxes.

    Args:
        model (GeneralizedRCNN): the detector whose sampled proposals are distilled.
        who (str): how messages name it ("the student", "peer0").
        fix (str): how to turn ROI distillation off.
    """
    from detectron2.modeling.roi_heads import StandardROIHeads

    heads = model.roi_heads
    if not isinstance(heads, StandardROIHeads) or not hasattr(heads, "box_pooler"):
        raise ValueError(
            f"ROI distillation needs StandardROIHeads-style box heads; {who} has "
            f"{type(heads).__name__}. {fix}"
        )
    if heads.mask_on or heads.keypoint_on:
        raise NotImplementedError(
            f"ROI distillation supports box-only detectors; {who} has mask or keypoint heads. "
            f"Disable MODEL.MASK_ON / KEYPOINT_ON, or: {fix}"
        )
    if heads.train_on_pred_boxes:
        raise NotImplementedError(
            f"MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported with ROI distillation "
            f"({who}). {fix}"
        )
