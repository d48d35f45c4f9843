"""``DistillationRCNN``: a Faster R-CNN student trained with hints from a frozen teacher.

The student IS the model: ``DistillationRCNN`` subclasses detectron2's ``GeneralizedRCNN`` and its
``state_dict()`` holds the student's keys (plus the trainable adapters under ``kd_adapters.``), so
a checkpoint loads into plain detectron2 and inference is plain ``GeneralizedRCNN`` inference. The
teacher lives in a :class:`~kd_det.modeling.teacher.TeacherHolder` outside the module tree.

Knowledge terms (each its own ``loss_kd_*`` entry, so detectron2's writers log them):

* ``loss_kd_fpn_<level>``: feature hints on FPN outputs (a loss of the feature-loss registry,
  :mod:`kd_det.modeling.losses`: SSIM (SSIM-KD paper), MSE, L1, PKD, CWD), optional foreground
  weighting from the ground-truth boxes.
* ``loss_kd_backbone_<level>``: low-level hints on the backbone's outputs before the FPN
  (e.g. ``res2``), which drive localization (MetaMixer's low-level knowledge).
* ``loss_kd_rpn_objectness`` / ``loss_kd_rpn_deltas``: the teacher's RPN on the same anchors: its
  objectness probabilities as soft targets (BCE), its deltas where it believes in an object.
* ``loss_kd_roi_cls`` / ``loss_kd_roi_box``: the student's sampled proposals are pooled from BOTH
  models' features and scored by both box heads; KL divergence of the class distributions at a
  temperature (times T^2, Hinton et al.), smooth-L1 between box deltas of foreground proposals.
  These high-level terms need a shared label space and are refused otherwise.

Every term is computed per image (a vector of N values and a validity mask, e.g. an image without
foreground proposals has no box term) and reduced by averaging valid images. This is what
instance-wise hint weighting (HKD) plugs into: with ``MODEL.KD.HINT_WEIGHTING: "dynamic"`` a
meta-weight network (:mod:`kd_det.modeling.hint_weighting`, under the ``kd_hint_weights.`` prefix)
gives every image its own weight per term and adds its own objective as ``loss_hint_meta``.
Terms are computed in float32 with autocast off.
With every weight at zero no teacher runs and training is exactly ``GeneralizedRCNN``'s.
"""

import logging

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.utils.events import get_event_storage
from torch import nn

from kd_det.config_validation import validate_kd_config

from .hint_weighting import HINT_WEIGHTINGS, HintWeighting
from .losses import feature_loss_from_config
from .teacher import TeacherHolder, build_teacher

logger = logging.getLogger(__name__)

__all__ = ["DistillationRCNN"]

ADAPTER_POLICIES = ("auto", "always", "none")


def _per_level(weights, levels, key):
    """Broadcast a one-element weight list to ``levels`` or check its length."""
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


def _class_specific(deltas, classes, box_dim=4):
    """Select each proposal's deltas for ``classes`` (works for class-agnostic regression too)."""
    if deltas.shape[1] == box_dim:
        return deltas
    idx = classes[:, None] * box_dim + torch.arange(box_dim, device=deltas.device)
    return deltas.gather(1, idx)


def foreground_maps(instances, shape, stride, device):
    """``(N, 1, H, W)`` maps that are 1 inside any ground-truth box (at feature ``stride``)."""
    n = len(instances)
    h, w = shape
    out = torch.zeros((n, 1, h, w), device=device)
    for i, inst in enumerate(instances):
        boxes = inst.gt_boxes.tensor
        if boxes.numel() == 0:
            continue
        x0 = (boxes[:, 0] / stride).floor().clamp(0, w).long()
        y0 = (boxes[:, 1] / stride).floor().clamp(0, h).long()
        x1 = (boxes[:, 2] / stride).ceil().clamp(0, w).long()
        y1 = (boxes[:, 3] / stride).ceil().clamp(0, h).long()
        for a, b, c, d in zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist()):
            out[i, 0, b:d, a:c] = 1.0
    return out


@META_ARCH_REGISTRY.register()
class DistillationRCNN(GeneralizedRCNN):
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
        self._taps = {}
        self._teacher_taps = {}
        # Student tensors each hint reads, recorded for the dynamic weighting's meta step.
        self._hint_inputs = {}
        self.kd_hint_weights = None
        if hint_weighting not in HINT_WEIGHTINGS:
            raise ValueError(
                f"MODEL.KD.HINT_WEIGHTING={hint_weighting!r} is not one of "
                f"{' | '.join(repr(h) for h in HINT_WEIGHTINGS)}."
            )
        if adapter not in ADAPTER_POLICIES:
            raise ValueError(
                f"MODEL.KD.FEATURE.ADAPTER={adapter!r} is not one of {ADAPTER_POLICIES}."
            )
        if not self.distills:
            if hint_weighting == "dynamic":
                logger.warning("MODEL.KD.HINT_WEIGHTING='dynamic' ignored: nothing is distilled.")
            self._teacher = None
            self.kd_adapters = nn.ModuleDict()
            return
        if teacher is None:
            raise ValueError("Distillation weights are set but no teacher was given.")
        self._teacher = TeacherHolder(teacher)
        self._check_compatible(teacher)
        # Trainable distillation parts live under one prefix so export can drop them.
        self.kd_adapters = self._build_adapters(teacher, adapter)
        if self.backbone_levels:
            self._tap(self.backbone.bottom_up, self._taps, "bottom_up")
            self._tap(teacher.backbone.bottom_up, self._teacher_taps, "bottom_up")
        if self.rpn_objectness_weight or self.rpn_deltas_weight:
            self._tap(self.proposal_generator.rpn_head, self._taps, "rpn")
        if hint_weighting == "dynamic":
            # Its own prefix: checkpointed and resumed with the model, dropped by the export.
            self.kd_hint_weights = HintWeighting(self.hint_names, **(hint_options or {}))

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg):
        validate_kd_config(cfg)  # ranges first: before a teacher or peer is built
        ret = super().from_config(cfg)
        kd = cfg.MODEL.KD
        fpn_levels = _per_level(kd.FEATURE.WEIGHTS, kd.FEATURE.LEVELS, "MODEL.KD.FEATURE.WEIGHTS")
        bb_levels = _per_level(kd.BACKBONE.WEIGHTS, kd.BACKBONE.LEVELS, "MODEL.KD.BACKBONE.WEIGHTS")
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
            if kd.ROI.CLS_WEIGHT or kd.ROI.BOX_WEIGHT:
                _check_label_space(cfg, tcfg)
        ret.update(
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
        return ret

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
    def teacher(self):
        """The frozen teacher (not a submodule), or None when nothing is distilled."""
        return None if self._teacher is None else self._teacher.get(self.device)

    @property
    def roi_distills(self):
        return bool(self.roi_cls_weight or self.roi_box_weight)

    def _check_compatible(self, teacher):
        s_shapes, t_shapes = self.backbone.output_shape(), teacher.backbone.output_shape()
        for lvl in self.fpn_levels:
            for who, shapes in (("student", s_shapes), ("teacher", t_shapes)):
                if lvl not in shapes:
                    raise ValueError(
                        f"MODEL.KD.FEATURE.LEVELS names '{lvl}', which the {who}'s backbone does "
                        f"not output (it has {sorted(shapes)})."
                    )
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
            for who, m in (("student", self), ("teacher", teacher)):
                heads = m.roi_heads
                if not isinstance(heads, StandardROIHeads) or not hasattr(heads, "box_pooler"):
                    raise ValueError(
                        f"ROI distillation needs StandardROIHeads-style box heads; the {who} "
                        f"has {type(heads).__name__}. Set MODEL.KD.ROI.*_WEIGHT to 0."
                    )
            if self.roi_heads.mask_on or self.roi_heads.keypoint_on:
                raise NotImplementedError(
                    "ROI distillation supports box-only students; disable MODEL.MASK_ON / "
                    "KEYPOINT_ON or set MODEL.KD.ROI.*_WEIGHT to 0."
                )
            if self.roi_heads.train_on_pred_boxes:
                raise NotImplementedError(
                    "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported with ROI distillation."
                )

    def _build_adapters(self, teacher, policy):
        adapters = nn.ModuleDict()
        pairs = [
            ("fpn_" + lvl, self.backbone.output_shape()[lvl], teacher.backbone.output_shape()[lvl])
            for lvl in self.fpn_levels
        ]
        if self.backbone_levels:
            s_out = self.backbone.bottom_up.output_shape()
            t_out = teacher.backbone.bottom_up.output_shape()
            pairs += [("backbone_" + lvl, s_out[lvl], t_out[lvl]) for lvl in self.backbone_levels]
        for name, s, t in pairs:
            if s.channels != t.channels and policy == "none":
                raise ValueError(
                    f"Feature hint '{name}': the student has {s.channels} channels and the "
                    f"teacher {t.channels}, and MODEL.KD.FEATURE.ADAPTER is 'none'. Set it to "
                    "'auto' to learn a 1x1 conv adapter, or distill other levels."
                )
            if s.channels != t.channels or policy == "always":
                conv = nn.Conv2d(s.channels, t.channels, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                adapters[name] = conv
        return adapters

    @staticmethod
    def _tap(module, store, key):
        def hook(_mod, _inp, out):
            store[key] = out

        module.register_forward_hook(hook)

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def forward(self, batched_inputs):
        """Training returns detection + distillation losses; inference is the student's own."""
        if not self.training or not self.distills:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        self._taps.clear()
        self._hint_inputs = {}
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        if self.roi_distills:
            sampled, predictions, detector_losses = self._student_box_forward(
                features, proposals, gt_instances
            )
        else:
            sampled, predictions = None, None
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)

        losses = {}
        losses.update(detector_losses)
        losses.update(proposal_losses)
        terms = self.distillation_terms(
            batched_inputs, features, gt_instances, sampled, predictions
        )
        scale = self.warmup_factor()
        if self.kd_hint_weights is None:
            for name, (values, valid, weight) in terms.items():
                losses[name] = weight * scale * _masked_mean(values, valid)
            return losses
        # Dynamic: weight_k * warmup * sum_i(valid_ik * w_ik * value_ik) / sum_i(valid_ik), with
        # detached w; the meta-net learns only from its own loss_hint_meta.
        hint_inputs, self._hint_inputs = self._hint_inputs, {}
        detection_loss = sum(detector_losses.values()) + sum(proposal_losses.values())
        hint_w, losses["loss_hint_meta"] = self.kd_hint_weights(
            terms, hint_inputs, detection_loss, get_event_storage().iter
        )
        for name, (values, valid, weight) in terms.items():
            losses[name] = weight * scale * _masked_mean(values * hint_w[name], valid)
        return losses

    def warmup_factor(self):
        """Linear warm-up of the distillation weights, from 1/WARMUP_ITERS to 1."""
        if self.warmup_iters <= 0:
            return 1.0
        it = get_event_storage().iter
        return min(1.0, (it + 1) / self.warmup_iters)

    def _student_box_forward(self, features, proposals, targets):
        """StandardROIHeads' training path, keeping the sampled proposals and predictions."""
        heads = self.roi_heads
        sampled = heads.label_and_sample_proposals(proposals, targets)
        box_features = heads.box_pooler(
            [features[f] for f in heads.box_in_features], [x.proposal_boxes for x in sampled]
        )
        predictions = heads.box_predictor(heads.box_head(box_features))
        losses = heads.box_predictor.losses(predictions, sampled)
        return sampled, predictions, losses

    def _teacher_inputs(self, batched_inputs):
        s_fmt, t_fmt = self.input_format, self.teacher_input_format
        if s_fmt == t_fmt:
            return batched_inputs
        if {s_fmt, t_fmt} == {"RGB", "BGR"}:
            return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]
        raise ValueError(
            f"The student reads {s_fmt} images and the teacher expects {t_fmt}; only RGB<->BGR "
            "can be converted. Train the teacher with the student's INPUT.FORMAT."
        )

    @torch.no_grad()
    def _teacher_forward(self, batched_inputs, sampled):
        teacher = self.teacher
        self._teacher_taps.clear()
        t_images = teacher.preprocess_image(self._teacher_inputs(batched_inputs))
        t_features = teacher.backbone(t_images.tensor)
        out = {"features": t_features, "bottom_up": self._teacher_taps.get("bottom_up")}
        if self.rpn_objectness_weight or self.rpn_deltas_weight:
            rpn = teacher.proposal_generator
            out["rpn"] = rpn.rpn_head([t_features[f] for f in rpn.in_features])
        if sampled is not None:
            heads = teacher.roi_heads
            box_features = heads.box_pooler(
                [t_features[f] for f in heads.box_in_features], [x.proposal_boxes for x in sampled]
            )
            out["roi"] = heads.box_predictor(heads.box_head(box_features))
        return out

    def distillation_terms(self, batched_inputs, features, gt_instances, sampled, predictions):
        """All enabled terms as ``name -> (per-image values (N,), valid (N,), weight)``."""
        t_out = self._teacher_forward(batched_inputs, sampled)
        n = len(batched_inputs)
        terms = {}
        with torch.autocast(device_type=self.device.type, enabled=False):
            for lvl, w in self.fpn_levels.items():
                s = features[lvl]
                stride = self.backbone.output_shape()[lvl].stride
                terms[f"loss_kd_fpn_{lvl}"] = (
                    *self._feature_term(
                        "fpn_" + lvl, s, t_out["features"][lvl], gt_instances, stride
                    ),
                    w,
                )
            if self.backbone_levels:
                s_bu, t_bu = self._taps["bottom_up"], t_out["bottom_up"]
                shapes = self.backbone.bottom_up.output_shape()
                for lvl, w in self.backbone_levels.items():
                    terms[f"loss_kd_backbone_{lvl}"] = (
                        *self._feature_term(
                            "backbone_" + lvl,
                            s_bu[lvl],
                            t_bu[lvl],
                            gt_instances,
                            shapes[lvl].stride,
                        ),
                        w,
                    )
            if "rpn" in t_out:
                obj, dlt = self._rpn_terms(self._taps["rpn"], t_out["rpn"], n)
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

    def _feature_term(self, name, s, t, gt_instances, stride):
        s = self._hint_input("loss_kd_" + name, s, s.float())
        if name in self.kd_adapters:
            s = self.kd_adapters[name](s)
        t = t.float()
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        weight_map = None
        if self.foreground_weight:
            fg = foreground_maps(gt_instances, s.shape[-2:], stride, s.device)
            weight_map = 1.0 + self.foreground_weight * fg
        values = self.feature_loss(s, t, weight_map=weight_map, per_image=True)
        return values, torch.ones_like(values, dtype=torch.bool)

    def _rpn_terms(self, s_rpn, t_rpn, n):
        s_obj, s_dlt = s_rpn
        t_obj, t_dlt = t_rpn
        obj_vals, dlt_num, fg_count = [], [], []
        box_dim = self.proposal_generator.anchor_generator.box_dim
        for so, to, sd, td in zip(s_obj, t_obj, s_dlt, t_dlt):
            so, to = self._hint_input("loss_kd_rpn_objectness", so, so.float()), to.float()
            if to.shape[-2:] != so.shape[-2:]:
                to = F.interpolate(to, size=so.shape[-2:], mode="nearest")
                td = F.interpolate(td, size=sd.shape[-2:], mode="nearest")
            p = torch.sigmoid(to)
            bce = F.binary_cross_entropy_with_logits(so, p, reduction="none")
            obj_vals.append(bce.flatten(1))
            a = so.shape[1]
            sd = self._hint_input("loss_kd_rpn_deltas", sd, sd.float())
            sd = sd.view(n, a, box_dim, *sd.shape[-2:])
            td = td.float().view(n, a, box_dim, *td.shape[-2:])
            mask = (p > 0.5).unsqueeze(2).float()
            l1 = F.smooth_l1_loss(sd, td, beta=0.0, reduction="none") * mask
            dlt_num.append(l1.flatten(1).sum(1))
            fg_count.append(mask.flatten(1).sum(1))
        obj = torch.cat(obj_vals, dim=1).mean(1)
        num, cnt = torch.stack(dlt_num, 1).sum(1), torch.stack(fg_count, 1).sum(1)
        dlt = num / (cnt * box_dim).clamp(min=1.0)
        return (obj, torch.ones_like(obj, dtype=torch.bool)), (dlt, cnt > 0)

    def _roi_terms(self, sampled, s_pred, t_pred):
        s_scores, s_deltas = s_pred
        t_scores, t_deltas = t_pred
        counts = [len(x) for x in sampled]
        s_scores = self._hint_input("loss_kd_roi_cls", s_scores, s_scores.float(), counts)
        s_deltas = self._hint_input("loss_kd_roi_box", s_deltas, s_deltas.float(), counts)
        T = self.temperature
        kl = F.kl_div(
            F.log_softmax(s_scores.float() / T, dim=1),
            F.log_softmax(t_scores.float() / T, dim=1),
            reduction="none",
            log_target=True,
        ).sum(1) * (T * T)
        gt_classes = torch.cat([x.gt_classes for x in sampled])
        num_classes = s_scores.shape[1] - 1
        fg = (gt_classes >= 0) & (gt_classes < num_classes)
        cls = gt_classes.clamp(max=num_classes - 1)
        s_d = _class_specific(s_deltas.float(), cls)
        t_d = _class_specific(t_deltas.float(), cls)
        box = F.smooth_l1_loss(s_d, t_d, beta=0.0, reduction="none").mean(1) * fg.float()
        cls_vals, box_vals, box_valid = [], [], []
        for k, b, f in zip(kl.split(counts), box.split(counts), fg.split(counts)):
            cls_vals.append(k.mean() if len(k) else kl.sum() * 0.0)
            nf = f.sum()
            box_vals.append(b.sum() / nf.clamp(min=1))
            box_valid.append(nf > 0)
        cls_vals = torch.stack(cls_vals)
        return (cls_vals, torch.tensor([c > 0 for c in counts], device=kl.device)), (
            torch.stack(box_vals),
            torch.stack(box_valid),
        )


def _masked_mean(values, valid):
    """Mean over valid images; an attached zero when none is valid (never NaN)."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp(min=1.0)


def _check_label_space(cfg, tcfg):
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
    from detectron2.data import DatasetCatalog

    for name in names:
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if hasattr(meta, "thing_classes"):
                return list(meta.thing_classes)
    return None
