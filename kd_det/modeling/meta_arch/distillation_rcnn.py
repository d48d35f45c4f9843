"""``DistillationRCNN``: a Faster R-CNN student trained with hints from a frozen teacher.

The student IS the model: a ``GeneralizedRCNN`` subclass whose ``state_dict()`` holds the
student's keys (plus trainable adapters under ``kd_adapters.``); the teacher lives in a
:class:`~kd_det.modeling.teacher.TeacherHolder` outside the module tree. Knowledge terms, each its
own ``loss_kd_*`` entry: FPN hints (a loss of :mod:`kd_det.modeling.losses`), backbone hints,
RPN objectness and deltas, ROI class KL and box deltas. Every term is computed per image with a
validity mask, in float32, and averaged over valid images, so that hint-dynamic weighting
(:mod:`kd_det.modeling.hint_weighting`) can weight each image. With every weight at zero no
teacher runs and training is exactly ``GeneralizedRCNN``'s.
See docs/distill_your_detector.md for the terms, their keys and requirements, and the logs.
"""

import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.utils.events import get_event_storage

from ..capture import (
    pop_recorded,
    pop_sampled_proposals,
    record_output,
    record_sampled_proposals,
    score_boxes,
)
from ..common import (
    ADAPTER_POLICIES,
    build_adapters,
    check_box_heads,
    check_teacher_parts,
    convert_input_format,
    match_levels,
    per_level_weights,
    preprocess_for,
    rcnn_head_needs,
)
from ..hint_weighting import HINT_WEIGHTING_REGISTRY, build_hint_weighting
from ..losses import (
    feature_loss_from_config,
    log_probs,
    masked_mean,
    roi_box_per_image,
    roi_kl_per_image,
    rpn_per_image,
)
from ..teacher import build_teacher, check_label_space
from .distillation_mixin import DistillationMixin

logger = logging.getLogger(__name__)

__all__ = ["DistillationRCNN"]


@META_ARCH_REGISTRY.register()
class DistillationRCNN(DistillationMixin, GeneralizedRCNN):
    """``GeneralizedRCNN`` student + frozen teacher + distillation losses (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        teacher,
        teacher_input_format,
        fpn_levels,
        backbone_levels,
        feature_loss,
        foreground_weight=0.0,
        adapter="auto",
        rpn_objectness_weight=0.0,
        rpn_deltas_weight=0.0,
        roi_cls_weight=0.0,
        roi_box_weight=0.0,
        temperature=2.0,
        warmup_iters=0,
        hint_weighting="fixed",
        hint_options=None,
        **kwargs,
    ):
        """
        Args:
            teacher (nn.Module): a frozen detector (``GeneralizedRCNN``-like), or None when every
                distillation weight is zero.
            teacher_input_format (str): the teacher's ``INPUT.FORMAT``; RGB/BGR inputs are flipped
                for it when it differs from the student's.
            fpn_levels (dict[str, float]): FPN level -> weight of its feature hint.
            backbone_levels (dict[str, float]): backbone output -> weight of its feature hint.
            feature_loss (nn.Module): per-level loss ``f(student, teacher, weight_map, per_image)``.
            foreground_weight (float): extra weight inside ground-truth boxes for feature hints.
            adapter (str): "auto", "always" or "none" (see ``MODEL.KD.FEATURE.ADAPTER``).
            rpn_objectness_weight, rpn_deltas_weight, roi_cls_weight, roi_box_weight (float):
                weights of the high-level terms.
            temperature (float): softmax temperature of the ROI class term.
            warmup_iters (int): linear warm-up of every distillation weight.
            hint_weighting (str): "fixed" (the weights above) or "dynamic" (per-image weights
                from a meta-weight network, see :mod:`kd_det.modeling.hint_weighting`).
            hint_options (dict): keyword arguments of
                :class:`~kd_det.modeling.hint_weighting.HintWeighting` when dynamic.
            kwargs: ``GeneralizedRCNN``'s arguments (the student).
        """
        super().__init__(**kwargs)
        self.fpn_levels = {k: v for k, v in fpn_levels.items() if v != 0}
        self.backbone_levels = {k: v for k, v in backbone_levels.items() if v != 0}
        self.feature_loss = feature_loss
        self.foreground_weight = float(foreground_weight)
        self.rpn_objectness_weight = float(rpn_objectness_weight)
        self.rpn_deltas_weight = float(rpn_deltas_weight)
        self.roi_cls_weight = float(roi_cls_weight)
        self.roi_box_weight = float(roi_box_weight)
        self.temperature = float(temperature)
        self.warmup_iters = int(warmup_iters)
        self.teacher_input_format = teacher_input_format
        # Student tensors each hint reads, recorded for the dynamic weighting's meta step.
        self._hint_inputs = {}
        self.kd_hint_weights = None
        if hint_weighting not in HINT_WEIGHTING_REGISTRY:
            build_hint_weighting(hint_weighting, [], {})  # raises, naming the registered ones
        if adapter not in ADAPTER_POLICIES:
            raise ValueError(
                f"MODEL.KD.FEATURE.ADAPTER={adapter!r} is not one of {ADAPTER_POLICIES}."
            )
        if not self.hold_teacher(teacher, teacher_input_format):
            if hint_weighting != "fixed":
                logger.warning(
                    f"MODEL.KD.HINT_WEIGHTING={hint_weighting!r} ignored: nothing is distilled."
                )
            return
        self._check_compatible(teacher)
        # Trainable distillation parts live under one prefix so export can drop them.
        self.kd_adapters = self._build_adapters(teacher, adapter)
        # The student runs GeneralizedRCNN.forward; these taps record what the terms read.
        record_output(self.backbone)
        if self.backbone_levels:
            record_output(self.backbone.bottom_up)
            record_output(teacher.backbone.bottom_up)
        if self.rpn_objectness_weight or self.rpn_deltas_weight:
            record_output(self.proposal_generator.rpn_head)
        if self.roi_distills:
            record_sampled_proposals(self.roi_heads)
            record_output(self.roi_heads.box_predictor)
        # Its own prefix: checkpointed and resumed with the model, dropped by the export.
        self.kd_hint_weights = build_hint_weighting(hint_weighting, self.hint_names, hint_options)
        if self.kd_hint_weights is not None:  # it reads the detection losses too
            if self.proposal_generator is not None:
                record_output(self.proposal_generator)
            record_output(self.roi_heads)

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def kd_arguments(cls, cfg):
        """The distillation arguments (teacher included) from ``cfg.MODEL.KD``: what
        ``from_config`` adds to ``GeneralizedRCNN``'s, and what a LazyConfig student is given
        (:func:`kd_det.modeling.lazy.distill`)."""
        kd = cfg.MODEL.KD
        fpn_levels = per_level_weights(
            kd.FEATURE.WEIGHTS, kd.FEATURE.LEVELS, "MODEL.KD.FEATURE.WEIGHTS"
        )
        bb_levels = per_level_weights(
            kd.BACKBONE.WEIGHTS, kd.BACKBONE.LEVELS, "MODEL.KD.BACKBONE.WEIGHTS"
        )
        weights = [
            *fpn_levels.values(),
            *bb_levels.values(),
            kd.RPN.OBJECTNESS_WEIGHT,
            kd.RPN.DELTAS_WEIGHT,
            kd.ROI.CLS_WEIGHT,
            kd.ROI.BOX_WEIGHT,
        ]
        teacher, tcfg = None, None
        if any(w != 0 for w in weights):
            teacher, tcfg = build_teacher(cfg)
            check_teacher_parts(teacher, rcnn_head_needs(kd))
            if kd.ROI.CLS_WEIGHT or kd.ROI.BOX_WEIGHT:
                check_label_space(cfg, tcfg)
        return dict(
            teacher=teacher,
            teacher_input_format=tcfg.INPUT.FORMAT if tcfg is not None else cfg.INPUT.FORMAT,
            fpn_levels=fpn_levels,
            backbone_levels=bb_levels,
            feature_loss=feature_loss_from_config(cfg, kd.FEATURE.LOSS),
            foreground_weight=kd.FEATURE.FOREGROUND_WEIGHT,
            adapter=kd.FEATURE.ADAPTER,
            rpn_objectness_weight=kd.RPN.OBJECTNESS_WEIGHT,
            rpn_deltas_weight=kd.RPN.DELTAS_WEIGHT,
            roi_cls_weight=kd.ROI.CLS_WEIGHT,
            roi_box_weight=kd.ROI.BOX_WEIGHT,
            temperature=kd.ROI.TEMPERATURE,
            warmup_iters=kd.WARMUP_ITERS,
            hint_weighting=kd.HINT_WEIGHTING,
            hint_options=dict(
                hidden_dim=kd.HINT.HIDDEN_DIM,
                objective=kd.HINT.OBJECTIVE,
                meta_loss_weight=kd.HINT.META_LOSS_WEIGHT,
                meta_period=kd.HINT.META_PERIOD,
                min_weight=kd.HINT.MIN_WEIGHT,
                prior_weight=kd.HINT.PRIOR_WEIGHT,
                momentum=kd.HINT.MOMENTUM,
                ensemble_weight=kd.HINT.ENSEMBLE_WEIGHT,
                max_iter=cfg.SOLVER.MAX_ITER,
            ),
        )

    @property
    def distills(self):
        """Whether any distillation term is on (otherwise no teacher is built or run)."""
        return bool(
            self.fpn_levels
            or self.backbone_levels
            or self.rpn_objectness_weight
            or self.rpn_deltas_weight
            or self.roi_cls_weight
            or self.roi_box_weight
        )

    @property
    def hint_names(self):
        """Loss names of the enabled terms, in the order ``distillation_terms`` produces them."""
        names = [f"loss_kd_fpn_{lvl}" for lvl in self.fpn_levels]
        names += [f"loss_kd_backbone_{lvl}" for lvl in self.backbone_levels]
        for name in ("rpn_objectness", "rpn_deltas", "roi_cls", "roi_box"):
            if getattr(self, name + "_weight"):
                names.append("loss_kd_" + name)
        return names

    @property
    def roi_distills(self):
        return bool(self.roi_cls_weight or self.roi_box_weight)

    def _check_compatible(self, teacher):
        # FPN levels are paired by stride (a RetinaNet teacher has P3-P7); unpaired ones logged.
        self.level_pairs = match_levels(
            self.fpn_levels,
            self.backbone.output_shape(),
            teacher.backbone.output_shape(),
            "MODEL.KD.FEATURE.LEVELS",
            logger,
        )
        self.fpn_levels = {k: v for k, v in self.fpn_levels.items() if k in self.level_pairs}
        if self.backbone_levels:
            for who, m in (("student", self), ("teacher", teacher)):
                if not hasattr(m.backbone, "bottom_up"):
                    raise ValueError(
                        f"MODEL.KD.BACKBONE.LEVELS needs an FPN backbone with a `bottom_up` "
                        f"network; the {who}'s {type(m.backbone).__name__} has none."
                    )
                shapes = m.backbone.bottom_up.output_shape()
                for lvl in self.backbone_levels:
                    if lvl not in shapes:
                        raise ValueError(
                            f"MODEL.KD.BACKBONE.LEVELS names '{lvl}', which the {who}'s backbone "
                            f"body does not output (it has {sorted(shapes)}); add it to its "
                            "OUT_FEATURES."
                        )
        if self.rpn_objectness_weight or self.rpn_deltas_weight:
            s_rpn, t_rpn = self.proposal_generator, teacher.proposal_generator
            if s_rpn is None or t_rpn is None:
                raise ValueError(
                    "RPN distillation needs an RPN in both models; the "
                    f"{'student' if s_rpn is None else 'teacher'} uses precomputed proposals. "
                    "Set MODEL.KD.RPN.*_WEIGHT to 0."
                )
            s_a = s_rpn.anchor_generator.num_anchors
            t_a = t_rpn.anchor_generator.num_anchors
            if s_a != t_a or len(s_rpn.in_features) != len(t_rpn.in_features):
                raise ValueError(
                    "RPN distillation compares objectness on the same anchors, but the student "
                    f"has {s_a} anchors per location on {s_rpn.in_features} and the teacher "
                    f"{t_a} on {t_rpn.in_features}. Use the same MODEL.ANCHOR_GENERATOR and "
                    "MODEL.RPN.IN_FEATURES, or set MODEL.KD.RPN.*_WEIGHT to 0."
                )
        if self.roi_distills:
            fix = "Set MODEL.KD.ROI.*_WEIGHT to 0."
            check_box_heads(self, "the student", fix)
            heads = teacher.roi_heads  # only scores the student's proposals
            if not isinstance(heads, StandardROIHeads) or not hasattr(heads, "box_pooler"):
                raise ValueError(
                    "ROI distillation needs StandardROIHeads-style box heads; the teacher has "
                    f"{type(heads).__name__}. {fix}"
                )

    def _build_adapters(self, teacher, policy):
        s_fpn, t_fpn = self.backbone.output_shape(), teacher.backbone.output_shape()
        pairs = [
            ("fpn_" + s, s_fpn[s].channels, t_fpn[t].channels) for s, t in self.level_pairs.items()
        ]
        if self.backbone_levels:
            s_out = self.backbone.bottom_up.output_shape()
            t_out = teacher.backbone.bottom_up.output_shape()
            pairs += [
                ("backbone_" + lvl, s_out[lvl].channels, t_out[lvl].channels)
                for lvl in self.backbone_levels
            ]
        return build_adapters(pairs, policy)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def forward(self, batched_inputs):
        """Training returns detection + distillation losses; inference is the student's own.

        The student's pass is ``GeneralizedRCNN.forward`` itself; the taps installed at build
        (:mod:`kd_det.modeling.capture`) record the features, RPN outputs, sampled proposals and
        box predictions the distillation terms read.
        """
        if not self.distills:
            return super().forward(batched_inputs)
        if not self.training:
            try:
                return super().forward(batched_inputs)
            finally:
                _release_records(self)
        self._hint_inputs = {}
        try:
            losses = super().forward(batched_inputs)
            features = pop_recorded(self.backbone)
            s_bottom_up = pop_recorded(self.backbone.bottom_up) if self.backbone_levels else None
            s_rpn = pop_recorded(self.proposal_generator.rpn_head) if "rpn" in self._parts else None
            sampled = pop_sampled_proposals(self.roi_heads) if self.roi_distills else None
            predictions = pop_recorded(self.roi_heads.box_predictor) if self.roi_distills else None
            if self.kd_hint_weights is not None:
                _, proposal_losses = pop_recorded(self.proposal_generator, (None, {}))
                _, detector_losses = pop_recorded(self.roi_heads)
        finally:
            _release_records(self)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        student = {"features": features, "bottom_up": s_bottom_up, "rpn": s_rpn}
        terms = self.distillation_terms(batched_inputs, student, gt_instances, sampled, predictions)
        if self.kd_hint_weights is None:
            return self.add_fixed_weight_terms(losses, terms)
        # Dynamic: weight_k * warmup * sum_i(valid_ik * w_ik * value_ik) / sum_i(valid_ik), with
        # detached w; the meta-net learns only from its own loss_hint_meta.
        hint_inputs, self._hint_inputs = self._hint_inputs, {}
        detection_loss = sum(detector_losses.values()) + sum(proposal_losses.values())
        hint_w, losses["loss_hint_meta"] = self.kd_hint_weights(
            terms, hint_inputs, detection_loss, get_event_storage().iter
        )
        scale = self.warmup_factor()
        for name, (values, valid, weight) in terms.items():
            losses[name] = weight * scale * masked_mean(values * hint_w[name], valid)
        return losses

    @property
    def _parts(self):
        return ("rpn",) if self.rpn_objectness_weight or self.rpn_deltas_weight else ()

    def _teacher_inputs(self, batched_inputs):
        return convert_input_format(batched_inputs, self.input_format, self.teacher_input_format)

    @torch.no_grad()
    def _teacher_forward(self, batched_inputs, sampled):
        """The teacher's FPN (and backbone body) features, RPN outputs and its box head's scores
        of the student's sampled proposals; no proposals of its own are generated."""
        teacher = self.teacher
        t_images = preprocess_for(teacher, self._teacher_inputs(batched_inputs))
        t_features = teacher.backbone(t_images.tensor)
        out = {"features": t_features, "bottom_up": None}
        if self.backbone_levels:
            out["bottom_up"] = pop_recorded(teacher.backbone.bottom_up)
        if "rpn" in self._parts:
            rpn = teacher.proposal_generator
            out["rpn"] = rpn.rpn_head([t_features[f] for f in rpn.in_features])
        if sampled is not None:
            boxes = [x.proposal_boxes for x in sampled]
            out["roi"] = score_boxes(teacher.roi_heads, t_features, boxes)
        return out

    def distillation_terms(self, batched_inputs, student, gt_instances, sampled, predictions):
        """All enabled terms as ``name -> (per-image values (N,), valid (N,), weight)``.

        Args:
            student (dict): the student's recorded ``features`` (FPN), ``bottom_up`` (backbone
                body outputs or None) and ``rpn`` (RPN head outputs or None).
            sampled (list[Instances] or None): the student's sampled proposals (ROI terms).
            predictions (tuple or None): the student's box predictions on them.
        """
        t_out = self._teacher_forward(batched_inputs, sampled)
        n = len(batched_inputs)
        terms = {}
        with torch.autocast(device_type=self.device.type, enabled=False):
            hint_sets = [("fpn", self.fpn_levels, "features", self.backbone)]
            if self.backbone_levels:
                hint_sets.append(
                    ("backbone", self.backbone_levels, "bottom_up", self.backbone.bottom_up)
                )
            for prefix, levels, key, net in hint_sets:
                shapes = net.output_shape()
                for lvl, w in levels.items():
                    name = f"{prefix}_{lvl}"
                    t_lvl = self.level_pairs[lvl] if prefix == "fpn" else lvl
                    s_map, t_map = student[key][lvl], t_out[key][t_lvl]
                    stride = shapes[lvl].stride
                    terms["loss_kd_" + name] = (
                        *self._feature_term(name, s_map, t_map, gt_instances, stride),
                        w,
                    )
            if "rpn" in t_out:
                box_dim = self.proposal_generator.anchor_generator.box_dim
                obj, dlt = rpn_per_image(
                    student["rpn"], t_out["rpn"], n, box_dim, alias=self._hint_input
                )
                if self.rpn_objectness_weight:
                    terms["loss_kd_rpn_objectness"] = (*obj, self.rpn_objectness_weight)
                if self.rpn_deltas_weight:
                    terms["loss_kd_rpn_deltas"] = (*dlt, self.rpn_deltas_weight)
            if sampled is not None:
                cls_t, box_t = self._roi_terms(sampled, predictions, t_out["roi"])
                if self.roi_cls_weight:
                    terms["loss_kd_roi_cls"] = (*cls_t, self.roi_cls_weight)
                if self.roi_box_weight:
                    terms["loss_kd_roi_box"] = (*box_t, self.roi_box_weight)
        return terms

    def _hint_input(self, name, student, x, counts=None):
        """``x`` (computed from the ``student`` tensor), read by hint ``name``.

        With dynamic weighting, returns a private alias of ``x`` and records it, so that the
        gradient of the hints w.r.t. the aliases separates every hint's own gradient in one
        backward pass. ``counts``: rows per image when dim 0 is not the image (ROI proposals).
        With fixed weighting ``x`` itself is returned (the computation is unchanged).
        """
        if self.kd_hint_weights is None:
            return x
        alias = x.view_as(x)
        self._hint_inputs.setdefault(name, []).append((student, alias, counts))
        return alias

    def _roi_terms(self, sampled, s_pred, t_pred):
        s_scores, s_deltas = s_pred
        t_scores, t_deltas = t_pred
        counts = [len(x) for x in sampled]
        s_scores = self._hint_input("loss_kd_roi_cls", s_scores, s_scores.float(), counts)
        s_deltas = self._hint_input("loss_kd_roi_box", s_deltas, s_deltas.float(), counts)
        t_logp = log_probs(t_scores, self.temperature)
        cls_t = roi_kl_per_image(s_scores, t_logp, counts, self.temperature)
        box_t = roi_box_per_image(s_scores, s_deltas, [t_deltas], sampled)
        return cls_t, box_t


def _release_records(model):
    """Drop whatever the taps recorded and was not read (e.g. after an exception)."""
    for module in model.modules():
        pop_recorded(module)
    pop_sampled_proposals(model.roi_heads)
