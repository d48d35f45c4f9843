"""``DistillationRetinaNet``: a RetinaNet student trained with hints from a frozen teacher.

Built as :class:`~kd_det.modeling.meta_arch.DistillationRCNN` is: the student IS the model (it
subclasses detectron2's ``RetinaNet``, so its checkpoint loads into plain detectron2 and inference
is plain RetinaNet inference), its own ``forward`` runs unchanged while forward hooks
(:mod:`kd_det.modeling.capture`) record what the terms read, the teacher lives in a
:class:`~kd_det.modeling.teacher.TeacherHolder` outside the module tree, and trainable parts are
under ``kd_adapters.``. Knowledge terms, each its own ``loss_kd_*`` entry:

* ``loss_kd_fpn_<level>``: feature hints on P3-P7 (any loss of the feature-loss registry), the
  teacher's level of the same stride (a Faster R-CNN teacher's P3-P6; P7 has no partner and is
  reported), channel adapters where the widths differ;
* ``loss_kd_dense_cls`` / ``loss_kd_dense_box``: dense-head KD on every anchor
  (:mod:`kd_det.modeling.losses.dense`: quality-focal BCE against the teacher's sigmoid
  probabilities; L1 or GIoU on the anchors the teacher or the ground truth makes foreground);
* ``loss_kd_crosskd_cls`` / ``loss_kd_crosskd_box``: CrossKD (:mod:`kd_det.modeling.crosskd`).

Every term is computed per image in float32 (autocast off) and averaged over the valid images.
With every weight at zero no teacher is built or run and training is exactly ``RetinaNet``'s.
"""

import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes

from ..capture import (
    pop_recorded,
    pop_recorded_each,
    pop_return,
    record_output,
    record_return,
)
from ..common import (
    build_adapters,
    check_teacher_parts,
    convert_input_format,
    match_levels,
    per_level_weights,
    preprocess_for,
)
from ..crosskd import CrossHead
from ..losses import (
    dense_box_per_image,
    dense_cls_per_image,
    feature_loss_from_config,
    foreground_anchors,
)
from ..teacher import build_teacher
from .distillation_mixin import DistillationMixin

logger = logging.getLogger(__name__)

__all__ = ["DistillationRetinaNet"]

#: Keys of DistillationRCNN's terms that a RetinaNet student cannot have (it has no RPN, ROI
#: heads or backbone-body hints here).
_RCNN_ONLY = (
    "MODEL.KD.RPN.OBJECTNESS_WEIGHT",
    "MODEL.KD.RPN.DELTAS_WEIGHT",
    "MODEL.KD.ROI.CLS_WEIGHT",
    "MODEL.KD.ROI.BOX_WEIGHT",
)


def _has_dense_head(model):
    return all(hasattr(model, a) for a in ("head", "head_in_features", "anchor_generator"))


@META_ARCH_REGISTRY.register()
class DistillationRetinaNet(DistillationMixin, RetinaNet):
    """``RetinaNet`` student + frozen teacher + distillation losses (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        teacher,
        teacher_input_format,
        fpn_levels,
        feature_loss,
        foreground_weight=0.0,
        adapter="auto",
        dense_cls_weight=0.0,
        dense_box_weight=0.0,
        cls_beta=1.0,
        box_loss="l1",
        score_thresh=0.5,
        crosskd_cls_weight=0.0,
        crosskd_box_weight=0.0,
        crosskd_teacher_convs=1,
        warmup_iters=0,
        **kwargs,
    ):
        """
        Args:
            teacher (nn.Module): a frozen detector with an FPN backbone (a RetinaNet for the
                dense and CrossKD terms), or None when every distillation weight is zero.
            teacher_input_format (str): the teacher's ``INPUT.FORMAT`` (RGB/BGR are converted).
            fpn_levels (dict[str, float]): student FPN level -> weight of its feature hint.
            feature_loss (nn.Module): per-level loss ``f(student, teacher, weight_map, per_image)``.
            foreground_weight (float): extra weight inside ground-truth boxes for feature hints.
            adapter (str): "auto", "always" or "none" (``MODEL.KD.FEATURE.ADAPTER``).
            dense_cls_weight, dense_box_weight (float): weights of the dense-head terms.
            cls_beta (float): focal exponent of the class terms.
            box_loss (str): "l1" or "giou" (box terms).
            score_thresh (float): teacher probability that makes an anchor foreground (box terms).
            crosskd_cls_weight, crosskd_box_weight (float): weights of the CrossKD terms.
            crosskd_teacher_convs (int): the teacher's tower blocks in the cross-head path.
            warmup_iters (int): linear warm-up of every distillation weight.
            kwargs: ``RetinaNet``'s arguments (the student).
        """
        super().__init__(**kwargs)
        self.fpn_levels = {k: float(v) for k, v in fpn_levels.items() if v != 0}
        self.feature_loss = feature_loss
        self.foreground_weight = float(foreground_weight)
        self.dense_cls_weight = float(dense_cls_weight)
        self.dense_box_weight = float(dense_box_weight)
        self.cls_beta = float(cls_beta)
        self.box_loss = box_loss
        self.score_thresh = float(score_thresh)
        self.crosskd_cls_weight = float(crosskd_cls_weight)
        self.crosskd_box_weight = float(crosskd_box_weight)
        self.warmup_iters = int(warmup_iters)
        self.teacher_input_format = teacher_input_format
        self.level_pairs = {}
        self._cross = None
        if not self.hold_teacher(teacher, teacher_input_format):
            return
        check_teacher_parts(teacher, self._needs())
        if not hasattr(teacher, "backbone") and self.fpn_levels:
            raise ValueError(
                f"MODEL.KD.FEATURE.LEVELS needs the teacher's backbone features; the teacher "
                f"({type(teacher).__name__}) has no `backbone`. Set MODEL.KD.FEATURE.WEIGHTS to 0."
            )
        if self.fpn_levels:
            self.level_pairs = match_levels(
                self.fpn_levels,
                self.backbone.output_shape(),
                teacher.backbone.output_shape(),
                "MODEL.KD.FEATURE.LEVELS",
                logger,
            )
            self.fpn_levels = {k: v for k, v in self.fpn_levels.items() if k in self.level_pairs}
        if self.reads_head:
            self._check_dense_pair(teacher)
        t_shapes = teacher.backbone.output_shape() if self.fpn_levels else {}
        s_shapes = self.backbone.output_shape()
        pairs = [
            ("fpn_" + s, s_shapes[s].channels, t_shapes[t].channels)
            for s, t in self.level_pairs.items()
        ]
        if self.crosskd:
            self._cross = CrossHead(self.head, teacher.head, crosskd_teacher_convs)
            pairs += [("crosskd_" + k, *ch) for k, ch in self._cross.channels.items()]
        # Trainable distillation parts live under one prefix so export can drop them.
        self.kd_adapters = build_adapters(pairs, adapter)
        # The student runs RetinaNet.forward; these taps record what the terms read.
        record_output(self.backbone)
        if self.reads_head:
            record_output(self.head)
            record_output(self.anchor_generator)
            record_return(self, "label_anchors")

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def kd_arguments(cls, cfg):
        """The distillation arguments (teacher included) from ``cfg.MODEL.KD``: what
        ``from_config`` adds to ``RetinaNet``'s, and what a LazyConfig student is given
        (:func:`kd_det.modeling.lazy.distill`)."""
        kd = cfg.MODEL.KD
        for key in _RCNN_ONLY:
            node = cfg
            for part in key.split("."):
                node = node[part]
            if node:
                raise ValueError(
                    f"{key} = {node}: a RetinaNet student has no RPN or ROI heads. Set it to 0; "
                    "MODEL.KD.DENSE.* and MODEL.KD.CROSSKD.* distill its dense head."
                )
        if kd.BACKBONE.LEVELS and any(kd.BACKBONE.WEIGHTS):
            raise ValueError(
                "MODEL.KD.BACKBONE.LEVELS is implemented for DistillationRCNN only; "
                "DistillationRetinaNet distills FPN levels (MODEL.KD.FEATURE.LEVELS). Set "
                "MODEL.KD.BACKBONE.LEVELS to []."
            )
        if kd.HINT_WEIGHTING != "fixed":
            raise ValueError(
                f"MODEL.KD.HINT_WEIGHTING = {kd.HINT_WEIGHTING!r} is implemented for "
                "DistillationRCNN only; use 'fixed' with DistillationRetinaNet."
            )
        fpn_levels = per_level_weights(
            kd.FEATURE.WEIGHTS, kd.FEATURE.LEVELS, "MODEL.KD.FEATURE.WEIGHTS"
        )
        weights = [
            *fpn_levels.values(),
            kd.DENSE.CLS_WEIGHT,
            kd.DENSE.BOX_WEIGHT,
            kd.CROSSKD.CLS_WEIGHT,
            kd.CROSSKD.BOX_WEIGHT,
        ]
        teacher, t_format = None, cfg.INPUT.FORMAT
        if any(w != 0 for w in weights):
            teacher, tcfg = build_teacher(cfg)
            t_format = tcfg.INPUT.FORMAT
        return dict(
            teacher=teacher,
            teacher_input_format=t_format,
            fpn_levels=fpn_levels,
            feature_loss=feature_loss_from_config(cfg, kd.FEATURE.LOSS),
            foreground_weight=kd.FEATURE.FOREGROUND_WEIGHT,
            adapter=kd.FEATURE.ADAPTER,
            dense_cls_weight=kd.DENSE.CLS_WEIGHT,
            dense_box_weight=kd.DENSE.BOX_WEIGHT,
            cls_beta=kd.DENSE.CLS_BETA,
            box_loss=kd.DENSE.BOX_LOSS,
            score_thresh=kd.DENSE.SCORE_THRESH,
            crosskd_cls_weight=kd.CROSSKD.CLS_WEIGHT,
            crosskd_box_weight=kd.CROSSKD.BOX_WEIGHT,
            crosskd_teacher_convs=kd.CROSSKD.TEACHER_CONVS,
            warmup_iters=kd.WARMUP_ITERS,
        )

    @property
    def dense(self):
        return bool(self.dense_cls_weight or self.dense_box_weight)

    @property
    def crosskd(self):
        return bool(self.crosskd_cls_weight or self.crosskd_box_weight)

    @property
    def reads_head(self):
        """Whether a term reads the head outputs (then anchors and labels are recorded too)."""
        return self.dense or self.crosskd

    @property
    def distills(self):
        """Whether any distillation term is on (otherwise no teacher is built or run)."""
        return bool(self.fpn_levels or self.reads_head)

    @property
    def hint_names(self):
        """Loss names of the enabled terms, in the order ``distillation_terms`` produces them."""
        names = [f"loss_kd_fpn_{lvl}" for lvl in self.fpn_levels]
        for name in ("dense_cls", "dense_box", "crosskd_cls", "crosskd_box"):
            if getattr(self, name + "_weight"):
                names.append("loss_kd_" + name)
        return names

    def _needs(self):
        """``(key, has(teacher), what)`` of the enabled head terms (for check_teacher_parts)."""
        what = "the teacher's dense head (a RetinaNet-style head, anchors)"
        return [
            (f"MODEL.KD.{key}", _has_dense_head, what)
            for key, w in (
                ("DENSE.CLS_WEIGHT", self.dense_cls_weight),
                ("DENSE.BOX_WEIGHT", self.dense_box_weight),
                ("CROSSKD.CLS_WEIGHT", self.crosskd_cls_weight),
                ("CROSSKD.BOX_WEIGHT", self.crosskd_box_weight),
            )
            if w
        ]

    def _check_dense_pair(self, teacher):
        """Head terms compare the two models anchor by anchor: same anchors, same classes."""
        fix = "Set MODEL.KD.DENSE.*_WEIGHT and MODEL.KD.CROSSKD.*_WEIGHT to 0."
        t_num = getattr(teacher, "num_classes", None)
        if (self.dense_cls_weight or self.crosskd_cls_weight) and t_num != self.num_classes:
            raise ValueError(
                f"The teacher predicts {t_num} classes and the student {self.num_classes}: the "
                "dense and CrossKD class terms (MODEL.KD.DENSE.CLS_WEIGHT, "
                "MODEL.KD.CROSSKD.CLS_WEIGHT) need the same label space. Set them to 0 to "
                "distill features and boxes only."
            )
        s_gen, t_gen = self.anchor_generator, teacher.anchor_generator
        s_strides = [self.backbone.output_shape()[f].stride for f in self.head_in_features]
        t_strides = [teacher.backbone.output_shape()[f].stride for f in teacher.head_in_features]
        same = s_strides == t_strides and len(s_gen.cell_anchors) == len(t_gen.cell_anchors)
        same = same and all(
            a.shape == b.shape and torch.allclose(a.cpu(), b.cpu())
            for a, b in zip(s_gen.cell_anchors, t_gen.cell_anchors)
        )
        same = same and getattr(s_gen, "offset", 0) == getattr(t_gen, "offset", 0)
        if not same:
            raise ValueError(
                "Dense-head and CrossKD distillation compare the two heads anchor by anchor, but "
                f"the student has anchors on strides {s_strides} ({self.head_in_features}) and "
                f"the teacher on {t_strides} ({teacher.head_in_features}), or other anchor "
                "sizes, aspect ratios or offset. Use the same MODEL.ANCHOR_GENERATOR and "
                f"MODEL.RETINANET.IN_FEATURES strides. {fix}"
            )

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def forward(self, batched_inputs):
        """Training returns detection + distillation losses; inference is the student's own.

        The student's pass is ``RetinaNet.forward`` itself; the taps installed at build record
        the FPN features, head outputs, anchors and anchor labels the terms read.
        """
        if not self.distills:
            return super().forward(batched_inputs)
        if not self.training:
            try:
                return super().forward(batched_inputs)
            finally:
                self._release_records()
        try:
            losses = super().forward(batched_inputs)
            student = {"features": pop_recorded(self.backbone)}
            if self.reads_head:
                student["head"] = pop_recorded(self.head)
                student["anchors"] = pop_recorded(self.anchor_generator)
                student["gt_labels"] = pop_return(self, "label_anchors")[0]
            if self.crosskd:
                feats = [student["features"][f] for f in self.head_in_features]
                student["tower"] = self._cross.student_features(feats, pop_recorded_each)
        finally:
            self._release_records()
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        terms = self.distillation_terms(batched_inputs, student, gt_instances)
        return self.add_fixed_weight_terms(losses, terms)

    def _release_records(self):
        """Drop whatever the taps recorded and was not read (e.g. after an exception)."""
        for module in (self.backbone, self.head, self.anchor_generator):
            pop_recorded(module)
        pop_return(self, "label_anchors")
        if self._cross is not None:
            self._cross.release(pop_recorded_each)

    @torch.no_grad()
    def _teacher_forward(self, batched_inputs):
        """The teacher's FPN features and, for head terms, its head outputs."""
        teacher = self.teacher
        inputs = convert_input_format(batched_inputs, self.input_format, self.teacher_input_format)
        features = teacher.backbone(preprocess_for(teacher, inputs).tensor)
        out = {"features": features}
        if self.reads_head:
            out["head"] = teacher.head([features[f] for f in teacher.head_in_features])
        return out

    def distillation_terms(self, batched_inputs, student, gt_instances):
        """All enabled terms as ``name -> (per-image values (N,), valid (N,), weight)``.

        Args:
            student (dict): the student's recorded ``features`` (FPN), and for head terms its
                ``head`` outputs, ``anchors``, anchor ``gt_labels`` and CrossKD ``tower``
                features.
        """
        t_out = self._teacher_forward(batched_inputs)
        terms = {}
        with torch.autocast(device_type=self.device.type, enabled=False):
            shapes = self.backbone.output_shape()
            for lvl, w in self.fpn_levels.items():
                name = "fpn_" + lvl
                s_map = student["features"][lvl]
                t_map = t_out["features"][self.level_pairs[lvl]]
                values = self._feature_term(name, s_map, t_map, gt_instances, shapes[lvl].stride)
                terms["loss_kd_" + name] = (*values, w)
            if self.reads_head:
                terms.update(self._head_terms(student, t_out["head"]))
        return terms

    @staticmethod
    def _flat(head_out, k):
        """Head outputs per level ``(N, A*K, H, W)`` -> ``(N, R, K)`` and ``(N, R, 4)``."""
        logits, deltas = head_out
        return (
            torch.cat([permute_to_N_HWA_K(x.float(), k) for x in logits], dim=1),
            torch.cat([permute_to_N_HWA_K(x.float(), 4) for x in deltas], dim=1),
        )

    def _head_terms(self, student, t_head):
        teacher = self.teacher
        t_logits, t_deltas = self._flat(t_head, teacher.num_classes)
        gt_labels = torch.stack(student["gt_labels"])
        normalizer = ((gt_labels >= 0) & (gt_labels != self.num_classes)).sum(1)
        anchors = Boxes.cat(student["anchors"]).tensor
        fg = foreground_anchors(gt_labels, t_logits, self.num_classes, self.score_thresh)
        outputs = []
        if self.dense:
            outputs.append(
                ("dense", self._flat(student["head"], self.num_classes), self.box2box_transform)
            )
        if self.crosskd:
            adapters = {k: self.kd_adapters[f"crosskd_{k}"] for k in ("cls", "box")
                        if f"crosskd_{k}" in self.kd_adapters}  # fmt: skip
            cross = self._cross(teacher.head, student["tower"], adapters)
            # The cross-head deltas come out of the teacher's predictor: the teacher's encoding.
            outputs.append(
                ("crosskd", self._flat(cross, teacher.num_classes), teacher.box2box_transform)
            )
        terms = {}
        for kind, (s_logits, s_deltas), transform in outputs:
            cls_w = getattr(self, f"{kind}_cls_weight")
            box_w = getattr(self, f"{kind}_box_weight")
            if s_deltas.shape != t_deltas.shape:
                raise RuntimeError(
                    f"{kind} terms: student head outputs {tuple(s_deltas.shape)} and teacher "
                    f"{tuple(t_deltas.shape)} differ; the two backbones pad images differently "
                    "(size_divisibility)."
                )
            if cls_w:
                values = dense_cls_per_image(s_logits, t_logits, normalizer, self.cls_beta)
                terms[f"loss_kd_{kind}_cls"] = (*values, cls_w)
            if box_w:
                values = dense_box_per_image(
                    s_deltas,
                    t_deltas,
                    anchors,
                    fg,
                    transform,
                    teacher.box2box_transform,
                    self.box_loss,
                )
                terms[f"loss_kd_{kind}_box"] = (*values, box_w)
        return terms
