"""Pieces every distillation meta-architecture shares: sub-model configs, input formats,
per-level weights, channel adapters, the warm-up rule, and what a mixed pair needs (levels matched
by stride, the teacher's heads checked against the terms that read them).

A teacher (offline) and the peers (online) are both complete detectors described by their own
config file plus ``KEY VALUE`` overrides; the student's data loader feeds all of them, so images
are converted to each sub-model's ``INPUT.FORMAT``. Student and teacher may be of different
families (a Faster R-CNN with P2-P6, a RetinaNet with P3-P7): feature hints pair the levels of
equal stride, and a term that reads a head the teacher lacks stops the build naming its key.
"""

import logging
import os

from detectron2.utils.events import get_event_storage
from torch import nn

__all__ = [
    "ADAPTER_POLICIES",
    "DISTILLATION_ARCHITECTURES",
    "STUDENT_ARCHITECTURES",
    "architecture_name",
    "build_adapter",
    "build_adapters",
    "check_teacher_parts",
    "build_sub_model_cfg",
    "check_convertible",
    "convert_input_format",
    "linear_warmup",
    "match_levels",
    "per_level_weights",
    "plain_architecture",
    "preprocess_for",
    "rcnn_head_needs",
]

#: Meta-architectures that cannot serve as a teacher or peer (they are not plain detectors).
DISTILLATION_ARCHITECTURES = ("DistillationRCNN", "DistillationRetinaNet", "OnlineDistillationRCNN")

#: The plain detectron2 meta-architecture of each offline distillation model's student: its
#: checkpoint loads into the plain one (adapters aside) and its inference is the plain one's.
STUDENT_ARCHITECTURES = {
    "DistillationRCNN": "GeneralizedRCNN",
    "DistillationRetinaNet": "RetinaNet",
}

_logger = logging.getLogger(__name__)


def plain_architecture(name, default="GeneralizedRCNN"):
    """The plain meta-architecture a student of ``name`` is evaluated, exported or compared as:
    the student's of a distillation model, ``name`` itself for a plain one, else ``default``."""
    if name in STUDENT_ARCHITECTURES:
        return STUDENT_ARCHITECTURES[name]
    return name if name in STUDENT_ARCHITECTURES.values() else default


#: Values of ``MODEL.KD.FEATURE.ADAPTER``.
ADAPTER_POLICIES = ("auto", "always", "none")


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


def build_adapters(pairs, policy):
    """The student-to-teacher channel adapters of ``pairs`` under ``MODEL.KD.FEATURE.ADAPTER``.

    Args:
        pairs (list[tuple(str, int, int)]): ``(hint name, student channels, teacher channels)``.
        policy (str): "auto" (a 1x1 conv where the channels differ), "always" or "none" (a
            mismatch is an error naming the hint and both counts).

    Returns:
        nn.ModuleDict: hint name -> adapter, for the hints that get one.
    """
    if policy not in ADAPTER_POLICIES:
        raise ValueError(f"MODEL.KD.FEATURE.ADAPTER={policy!r} is not one of {ADAPTER_POLICIES}.")
    adapters = nn.ModuleDict()
    for name, s, t in pairs:
        if s != t and policy == "none":
            raise ValueError(
                f"Feature hint '{name}': the student has {s} channels and the teacher {t}, and "
                "MODEL.KD.FEATURE.ADAPTER is 'none'. Set it to 'auto' to learn a 1x1 conv "
                "adapter, or distill other levels."
            )
        if s != t or policy == "always":
            adapters[name] = build_adapter(s, t)
    return adapters


def match_levels(levels, s_shapes, t_shapes, key, logger=None):
    """Pair each student level in ``levels`` with the teacher's output of the same stride.

    Families name their levels alike (``p<k>`` has stride ``2**k`` in detectron2's FPNs) but not
    every model has every level: a Faster R-CNN has P2-P6, a RetinaNet P3-P7. Levels are matched
    by stride, not by name, so a backbone with other names still pairs correctly. A requested
    level the teacher lacks is dropped with a warning; the levels that exist in only one model
    are logged before training, so a user sees what is not distilled.

    Args:
        levels (iterable[str]): student levels requested (``MODEL.KD.FEATURE.LEVELS``).
        s_shapes, t_shapes (dict[str, ShapeSpec]): the backbones' ``output_shape()``.
        key (str): the config key, for messages.
        logger (logging.Logger): where the report goes (this module's by default).

    Returns:
        dict[str, str]: student level -> teacher level, in the order of ``levels``.

    Raises:
        ValueError: a requested level that the student does not output, or no level left.
    """
    log = logger or _logger
    levels = list(levels)
    by_stride = {spec.stride: name for name, spec in t_shapes.items()}
    pairs, dropped = {}, []
    for lvl in levels:
        if lvl not in s_shapes:
            raise ValueError(
                f"{key} names '{lvl}', which the student's backbone does not output (it has "
                f"{sorted(s_shapes)})."
            )
        t_lvl = by_stride.get(s_shapes[lvl].stride)
        if t_lvl is None:
            dropped.append(lvl)
        else:
            pairs[lvl] = t_lvl
    s_strides = {spec.stride for spec in s_shapes.values()}
    t_strides = {spec.stride for spec in t_shapes.values()}
    only_s = sorted((n for n, v in s_shapes.items() if v.stride not in t_strides), key=str)
    only_t = sorted((n for n, v in t_shapes.items() if v.stride not in s_strides), key=str)
    if only_s or only_t:
        log.info(
            f"Feature levels in only one model (by stride): student {only_s or 'none'}, "
            f"teacher {only_t or 'none'}; they are not distilled."
        )
    if dropped:
        log.warning(
            f"{key}: {dropped} have no teacher level of the same stride (teacher levels "
            f"{sorted(t_shapes)}); not distilled."
        )
    if levels and not pairs:
        raise ValueError(
            f"{key} = {levels}: none of them has a teacher level of the same stride (teacher "
            f"levels {sorted(t_shapes)}, strides {sorted(t_strides)})."
        )
    renamed = {s: t for s, t in pairs.items() if s != t}
    if renamed:
        log.info(f"Feature levels matched by stride (student -> teacher): {renamed}")
    return pairs


def architecture_name(model):
    """How messages name a detector: its class, plus its ROI heads' class when it has some
    (``GeneralizedRCNN with CascadeROIHeads``)."""
    name = type(model).__name__
    heads = getattr(model, "roi_heads", None)
    return f"{name} with {type(heads).__name__}" if heads is not None else name


def check_teacher_parts(teacher, needs):
    """Stop the build when a term reads a part the teacher does not have.

    A RetinaNet has no RPN or ROI heads, an R-CNN no dense head: without this check such a pair
    builds and fails at the first step with an ``AttributeError`` naming neither the term nor the
    model.

    Args:
        teacher (nn.Module): the built teacher.
        needs (list[tuple(str, callable, str)]): one per enabled term, ``(config key,
            has(teacher) -> bool, what the term reads)``.

    Raises:
        ValueError: naming the key, the teacher's architecture and what is missing.
    """
    for key, has, what in needs:
        if not has(teacher):
            raise ValueError(
                f"{key} needs {what}, but the teacher is a {architecture_name(teacher)}, which "
                f"has none. Set {key} to 0 (feature hints, MODEL.KD.FEATURE.*, work with any "
                "teacher that has an FPN backbone), or use a teacher with that head."
            )


def rcnn_head_needs(kd):
    """``(key, has(teacher), what)`` of the enabled R-CNN terms of ``kd`` (``cfg.MODEL.KD``) that
    read a head of the teacher, for :func:`check_teacher_parts` (a RetinaNet teacher has no RPN or
    ROI heads, a cascade one box predictor per stage)."""
    from detectron2.modeling.roi_heads import StandardROIHeads

    rpn = (
        lambda t: getattr(t, "proposal_generator", None) is not None
        and hasattr(t.proposal_generator, "rpn_head"),
        "the teacher's RPN",
    )
    roi = (
        lambda t: isinstance(getattr(t, "roi_heads", None), StandardROIHeads)
        and hasattr(t.roi_heads, "box_pooler")
        and not isinstance(getattr(t.roi_heads, "box_predictor", None), nn.ModuleList),
        "the teacher's StandardROIHeads-style box head (one box predictor; a cascade has one "
        "per stage)",
    )
    keys = (("RPN.OBJECTNESS_WEIGHT", rpn), ("RPN.DELTAS_WEIGHT", rpn), ("ROI.CLS_WEIGHT", roi),
            ("ROI.BOX_WEIGHT", roi))  # fmt: skip
    out = []
    for key, (has, what) in keys:
        section, name = key.split(".")
        if kd[section][name]:
            out.append((f"MODEL.KD.{key}", has, what))
    return out


def preprocess_for(model, batched_inputs):
    """``model``'s own normalization and padding of ``batched_inputs`` (an ``ImageList``).

    Detectors with ``preprocess_image`` (R-CNNs, dense detectors) use it; others are normalized
    with their ``pixel_mean``/``pixel_std`` and padded to their backbone's size divisibility.
    """
    if hasattr(model, "preprocess_image"):
        return model.preprocess_image(batched_inputs)
    from detectron2.structures import ImageList

    images = [(x["image"].to(model.pixel_mean.device) - model.pixel_mean) / model.pixel_std
              for x in batched_inputs]  # fmt: skip
    return ImageList.from_tensors(images, model.backbone.size_divisibility)
