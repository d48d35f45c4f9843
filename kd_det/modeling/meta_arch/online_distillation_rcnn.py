"""``OnlineDistillationRCNN``: peer Faster R-CNNs that teach each other, plus EMA teachers.

Each peer is a complete ``GeneralizedRCNN`` built from its own config
(:mod:`kd_det.modeling.online.peers`), held in the ``nn.ModuleList`` ``peers``; taps
(:mod:`kd_det.modeling.capture`) record what the knowledge terms read. Loss entries: each peer's
own detection losses (``loss_peer<i>_*``), mutual feature and ROI-logit terms against the other
peers' detached outputs (``loss_kd_peer<i>_*_from_peer<j>``), and terms from the EMA teachers
(:mod:`kd_det.modeling.online.ema`, ``loss_kd_peer<i>_ema_*``); zero-weight terms are skipped.
``MODEL.ONLINE_KD.INFERENCE`` names the member that runs at inference (``peer<i>`` or ``ema<i>``).
See docs/online_distillation.md for the terms and keys, the EMA teacher, members and memory.
"""

import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_model
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n
from torch import nn

from kd_det.config.validation import check_values, validate_kd_config

from .. import capture
from ..common import check_convertible, convert_input_format, linear_warmup, per_level_weights
from ..online.ema import buffer_copy, ema_update, fill_missing_ema
from ..losses import (
    feature_hint_per_image,
    feature_loss_from_config,
    log_probs,
    masked_mean,
    mean_log_probs,
    roi_box_per_image,
    roi_kl_per_image,
)
from ..online.peers import (
    build_mutual_adapters,
    build_peer_cfg,
    check_peers,
    check_label_spaces,
    load_peer_weights,
    parse_member,
)

logger = logging.getLogger(__name__)

__all__ = ["OnlineDistillationRCNN"]

LOGIT_TARGETS = ("each", "average")
EMA_LOGIT_TARGETS = ("own", "ensemble")


@META_ARCH_REGISTRY.register()
class OnlineDistillationRCNN(nn.Module):
    """Peer detectors trained together with mutual and EMA distillation (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        peers,
        input_format,
        peer_input_formats,
        feature_loss,
        feature_levels,
        logit_weight=0.0,
        temperature=2.0,
        logit_target="each",
        mutual_warmup=0,
        ema_enabled=True,
        ema_decay=0.999,
        ema_warmup=0,
        ema_feature_levels=None,
        ema_logit_weight=0.0,
        ema_box_weight=0.0,
        ema_logit_target="ensemble",
        inference="peer0",
    ):
        """
        Args:
            peers (list[GeneralizedRCNN]): two or more detectors sharing one label space.
            input_format (str): the format of the images the data loader gives (``INPUT.FORMAT``).
            peer_input_formats (list[str]): each peer's ``INPUT.FORMAT``.
            feature_loss (nn.Module): per-level loss ``f(student, target, weight_map, per_image)``.
            feature_levels (dict[str, float]): FPN level -> weight of the mutual feature term.
            logit_weight (float): weight of the mutual ROI class KL term.
            temperature (float): softmax temperature of every KL term.
            logit_target (str): "each" (one term per other peer) or "average".
            mutual_warmup (int): the mutual (peer-to-peer) weights ramp linearly to their value
                over this many iterations (:func:`.common.linear_warmup`); 0: no ramp.
            ema_enabled (bool): keep EMA copies of the peers (required by any ``ema_*`` weight).
            ema_decay (float): EMA decay ``d`` of :meth:`update_ema`.
            ema_warmup (int): iterations before the EMA terms start.
            ema_feature_levels (dict[str, float]): FPN level -> weight of the EMA feature hint.
            ema_logit_weight, ema_box_weight (float): weights of the EMA ROI class / box terms.
            ema_logit_target (str): "own" or "ensemble" (docs/online_distillation.md).
            inference (str): the member run in eval mode.
        """
        super().__init__()
        if len(peers) < 2:
            raise ValueError(
                f"Online distillation needs two or more peers (MODEL.ONLINE_KD.PEERS), got "
                f"{len(peers)}."
            )
        for i, p in enumerate(peers):
            if not isinstance(p, GeneralizedRCNN):
                raise ValueError(
                    f"peer{i} is a {type(p).__name__}; peers must be GeneralizedRCNN detectors."
                )
        if logit_target not in LOGIT_TARGETS:
            raise ValueError(
                f"MODEL.ONLINE_KD.LOGIT_TARGET={logit_target!r} is not one of {LOGIT_TARGETS}."
            )
        if ema_logit_target not in EMA_LOGIT_TARGETS:
            raise ValueError(
                f"MODEL.ONLINE_KD.EMA_LOGIT_TARGET={ema_logit_target!r} is not one of "
                f"{EMA_LOGIT_TARGETS}."
            )
        self.peers = nn.ModuleList(peers)
        self.input_format = input_format
        self.peer_input_formats = list(peer_input_formats)
        self.feature_loss = feature_loss
        self.feature_levels = {k: float(v) for k, v in feature_levels.items() if v != 0}
        self.logit_weight = float(logit_weight)
        self.temperature = float(temperature)
        self.logit_target = logit_target
        self.mutual_warmup = int(mutual_warmup)
        self.ema_decay = float(ema_decay)
        self.ema_warmup = int(ema_warmup)
        self.ema_feature_levels = {
            k: float(v) for k, v in (ema_feature_levels or {}).items() if v != 0
        }
        self.ema_logit_weight = float(ema_logit_weight)
        self.ema_box_weight = float(ema_box_weight)
        self.ema_logit_target = ema_logit_target
        if not ema_enabled and self.ema_distills:
            raise ValueError(
                "MODEL.ONLINE_KD.EMA_* weights are set but EMA_ENABLED is False; enable the EMA "
                "teachers or set EMA_FEATURE_WEIGHTS [0.0], EMA_LOGIT_WEIGHT 0, EMA_BOX_WEIGHT 0."
            )
        check_values({"MODEL.ONLINE_KD.EMA_DECAY": self.ema_decay})
        for i, fmt in enumerate(self.peer_input_formats):
            check_convertible(self.input_format, fmt, f"peer{i}")
        check_peers(
            self.peers,
            set(self.feature_levels) | set(self.ema_feature_levels),
            (
                "Set LOGIT_WEIGHT / EMA_LOGIT_WEIGHT / EMA_BOX_WEIGHT to 0."
                if self._needs_roi
                else None
            ),
        )
        # Trainable distillation parts under one prefix, so an export can drop them.
        self.kd_adapters = build_mutual_adapters(self.peers, self.feature_levels).to(self.device)
        # Built after the peers got their initial weights: the EMA starts from them.
        self.ema_peers = nn.ModuleList(
            [buffer_copy(p) for p in self.peers] if ema_enabled else []
        ).train(False)
        # Number of EMA updates (saved): detects a training loop that never calls update_ema().
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long, device=self.device))
        self._ema_update_seen = False
        self.register_load_state_dict_pre_hook(self._init_missing_ema)
        self.set_inference_member(inference)
        # Taps on the peers (after the EMA copies, which need none): each peer runs its own
        # GeneralizedRCNN.forward and these record what the terms read (kd_det.modeling.capture).
        for peer in self.peers:
            capture.record_output(peer.backbone)
            if self._needs_roi:
                capture.record_sampled_proposals(peer.roi_heads)
                capture.record_output(peer.roi_heads.box_predictor)

    @classmethod
    def from_config(cls, cfg):
        validate_kd_config(cfg)  # ranges first: before a teacher or peer is built
        okd = cfg.MODEL.ONLINE_KD
        if len(okd.PEERS) < 2:
            raise ValueError(
                "MODEL.ONLINE_KD.PEERS must name two or more peer config files, got "
                f"{list(okd.PEERS)}."
            )
        # Cheap checks first: fail before any peer is built or weights are loaded.
        parse_member(okd.INFERENCE, len(okd.PEERS), okd.EMA_ENABLED)
        peer_cfgs = [build_peer_cfg(cfg, i) for i in range(len(okd.PEERS))]
        check_label_spaces(cfg, peer_cfgs)
        peers = []
        for i, pcfg in enumerate(peer_cfgs):
            peer = build_model(pcfg)
            if okd.LOAD_PEER_WEIGHTS and pcfg.MODEL.WEIGHTS:
                load_peer_weights(peer, pcfg.MODEL.WEIGHTS, i)
            peers.append(peer)
        return {
            "peers": peers,
            "input_format": cfg.INPUT.FORMAT,
            "peer_input_formats": [p.INPUT.FORMAT for p in peer_cfgs],
            "feature_loss": feature_loss_from_config(cfg, okd.FEATURE_LOSS),
            "feature_levels": per_level_weights(
                okd.FEATURE_WEIGHTS, okd.FEATURE_LEVELS, "MODEL.ONLINE_KD.FEATURE_WEIGHTS"
            ),
            "logit_weight": okd.LOGIT_WEIGHT,
            "temperature": okd.TEMPERATURE,
            "logit_target": okd.LOGIT_TARGET,
            "mutual_warmup": okd.MUTUAL_WARMUP,
            "ema_enabled": okd.EMA_ENABLED,
            "ema_decay": okd.EMA_DECAY,
            "ema_warmup": okd.EMA_WARMUP,
            "ema_feature_levels": per_level_weights(
                okd.EMA_FEATURE_WEIGHTS, okd.FEATURE_LEVELS, "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS"
            ),
            "ema_logit_weight": okd.EMA_LOGIT_WEIGHT,
            "ema_box_weight": okd.EMA_BOX_WEIGHT,
            "ema_logit_target": okd.EMA_LOGIT_TARGET,
            "inference": okd.INFERENCE,
        }

    # ------------------------------------------------------------------------------------------
    # properties and members
    # ------------------------------------------------------------------------------------------
    @property
    def device(self):
        return self.peers[0].device

    @property
    def ema_distills(self):
        """Whether any EMA term is on (otherwise no EMA model runs in training)."""
        return bool(self.ema_feature_levels or self.ema_logit_weight or self.ema_box_weight)

    @property
    def _needs_roi(self):
        """Whether any term reads the peers' sampled proposals and box predictions."""
        return bool(self.logit_weight or self._ema_roi)

    @property
    def _ema_roi(self):
        return bool(self.ema_logit_weight or self.ema_box_weight)

    def member_names(self):
        """``["peer0", "peer1", ..., "ema0", ...]``: everything that can be evaluated/exported."""
        names = [f"peer{i}" for i in range(len(self.peers))]
        return names + [f"ema{i}" for i in range(len(self.ema_peers))]

    def member(self, name):
        """The detector called ``name`` (``peer<i>`` or ``ema<i>``)."""
        kind, index = parse_member(name, len(self.peers), len(self.ema_peers) > 0)
        return (self.peers if kind == "peer" else self.ema_peers)[index]

    def set_inference_member(self, name):
        """Choose the member that ``forward`` runs in eval mode."""
        parse_member(name, len(self.peers), len(self.ema_peers) > 0)
        self.inference_member = name

    def train(self, mode=True):
        """Peers follow ``mode``; EMA teachers stay in eval mode (running BN statistics)."""
        super().train(mode)
        self.ema_peers.train(False)
        return self

    # ------------------------------------------------------------------------------------------
    # construction checks
    # ------------------------------------------------------------------------------------------

    # ------------------------------------------------------------------------------------------
    # EMA
    # ------------------------------------------------------------------------------------------
    def update_ema(self):
        """``w_ema <- d * w_ema + (1 - d) * w`` for every parameter and floating-point buffer
        (:func:`~kd_det.modeling.online.ema.ema_update`).

        Call once after every optimizer step (``kd_det.engine.hooks.EMAUpdateHook`` does).
        """
        for peer, ema in zip(self.peers, self.ema_peers):
            ema_update(peer, ema, self.ema_decay)
        self.ema_updates += 1

    def _init_missing_ema(self, module, state_dict, prefix, *args, **kwargs):
        """Loading a checkpoint without EMA weights: start each EMA from the loaded peer."""
        filled = 0
        for i, ema in enumerate(self.ema_peers):
            keys = ema.state_dict().keys()
            filled += fill_missing_ema(state_dict, keys, prefix, f"ema_peers.{i}.", f"peers.{i}.")
        if f"{prefix}ema_updates" not in state_dict:
            state_dict[f"{prefix}ema_updates"] = torch.zeros((), dtype=torch.long)
        if filled:
            logger.warning(
                f"The loaded weights have no EMA teachers; {filled} EMA tensors were initialised "
                "from the loaded peers."
            )

    def mutual_factor(self):
        """Linear warm-up of the mutual weights over ``MUTUAL_WARMUP`` iterations, by the rule every
        distillation weight uses (:func:`~kd_det.modeling.common.linear_warmup`).

        Randomly initialised peers teach each other noise at first, so the mutual terms grow
        while the peers learn from ground truth (docs/online_distillation.md, "Mutual warm-up").
        """
        return linear_warmup(self.mutual_warmup)

    def _ema_active(self):
        it = get_event_storage().iter
        active = len(self.ema_peers) > 0 and self.ema_distills and it >= self.ema_warmup
        if active and it > 0 and not self._ema_update_seen:
            # A silently frozen teacher would distill the initial weights forever.
            self._ema_update_seen = bool(self.ema_updates.item() > 0)
            if not self._ema_update_seen:
                log_first_n(
                    logging.WARNING,
                    "OnlineDistillationRCNN: the EMA teachers were never updated. Call "
                    "model.update_ema() after every optimizer step (KDTrainer registers a hook "
                    "for it); until then they teach the initial weights.",
                    name=__name__,
                )
        return active

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def _peer_inputs(self, index, batched_inputs):
        """Inputs in peer ``index``'s format (RGB<->BGR flipped when the loader's differs)."""
        return convert_input_format(
            batched_inputs, self.input_format, self.peer_input_formats[index]
        )

    def forward(self, batched_inputs):
        """Training: every peer's losses + knowledge terms. Eval: the ``INFERENCE`` member's
        predictions (a plain ``GeneralizedRCNN`` output)."""
        try:
            if not self.training:
                _, index = parse_member(self.inference_member, len(self.peers), True)
                member = self.member(self.inference_member)
                return member(self._peer_inputs(index, batched_inputs))
            losses, outs = {}, []
            for i, peer in enumerate(self.peers):
                # The peer's own GeneralizedRCNN.forward; the taps keep what the terms read.
                for k, v in peer(self._peer_inputs(i, batched_inputs)).items():
                    losses[_peer_loss_name(i, k)] = v
                outs.append(self._recorded(peer))
            terms = self.distillation_terms(batched_inputs, outs)
        finally:
            for peer in self.peers:
                self._recorded(peer)
        for name, (values, valid, weight) in terms.items():
            losses[name] = weight * masked_mean(values, valid)
        return losses

    def _recorded(self, peer):
        """What ``peer``'s taps recorded in its last forward (features; sampled proposals and
        box predictions when ROI terms are on), released from the peer."""
        out = {
            "features": capture.pop_recorded(peer.backbone),
            "sampled": None,
            "predictions": None,
        }
        if self._needs_roi:
            out["sampled"] = capture.pop_sampled_proposals(peer.roi_heads)
            out["predictions"] = capture.pop_recorded(peer.roi_heads.box_predictor)
        return out

    def distillation_terms(self, batched_inputs, outs):
        """All enabled terms as ``name -> (per-image values (N,), valid (N,), weight)``."""
        n = len(self.peers)
        peer_scores = self._peer_scores(outs) if self.logit_weight else None
        ema_outs = self._ema_forward(batched_inputs, outs) if self._ema_active() else None
        T = self.temperature
        mutual = self.mutual_factor()
        terms = {}
        with torch.autocast(device_type=self.device.type, enabled=False):
            for i in range(n):
                feats = outs[i]["features"]
                for j in range(n):
                    if j == i:
                        continue
                    for lvl, w in self.feature_levels.items():
                        terms[f"loss_kd_peer{i}_fpn_{lvl}_from_peer{j}"] = (
                            *self._feature_term(
                                feats[lvl], outs[j]["features"][lvl].detach(), f"p{i}_to_p{j}_{lvl}"
                            ),
                            w * mutual,
                        )
                if peer_scores is not None:
                    s_scores = outs[i]["predictions"][0]
                    counts = [len(x) for x in outs[i]["sampled"]]
                    targets = {j: log_probs(t, T) for j, t in peer_scores[i].items()}
                    if self.logit_target == "each":
                        for j, t_logp in targets.items():
                            terms[f"loss_kd_peer{i}_roi_cls_from_peer{j}"] = (
                                *roi_kl_per_image(s_scores, t_logp, counts, T),
                                self.logit_weight * mutual,
                            )
                    else:
                        t_logp = mean_log_probs(list(targets.values()))
                        terms[f"loss_kd_peer{i}_roi_cls_from_peers"] = (
                            *roi_kl_per_image(s_scores, t_logp, counts, T),
                            self.logit_weight * mutual,
                        )
                if ema_outs is None:
                    continue
                for lvl, w in self.ema_feature_levels.items():
                    terms[f"loss_kd_peer{i}_ema_fpn_{lvl}"] = (
                        *self._feature_term(feats[lvl], ema_outs[i]["features"][lvl], None),
                        w,
                    )
                if self._ema_roi:
                    sampled = outs[i]["sampled"]
                    s_scores, s_deltas = outs[i]["predictions"]
                    counts = [len(x) for x in sampled]
                    preds = ema_outs[i]["roi"]
                    if self.ema_logit_weight:
                        t_logp = mean_log_probs([log_probs(s, T) for s, _ in preds])
                        terms[f"loss_kd_peer{i}_ema_roi_cls"] = (
                            *roi_kl_per_image(s_scores, t_logp, counts, T),
                            self.ema_logit_weight,
                        )
                    if self.ema_box_weight:
                        terms[f"loss_kd_peer{i}_ema_roi_box"] = (
                            *roi_box_per_image(s_scores, s_deltas, [d for _, d in preds], sampled),
                            self.ema_box_weight,
                        )
        return terms

    def _feature_term(self, s, t, adapter):
        adapter = self.kd_adapters[adapter] if adapter in self.kd_adapters else None
        return feature_hint_per_image(self.feature_loss, s, t, adapter)

    @torch.no_grad()
    def _peer_scores(self, outs):
        """``scores[i][j]``: peer j's class logits on peer i's sampled proposals (no gradient)."""
        scores = []
        for i, out in enumerate(outs):
            boxes = [x.proposal_boxes for x in out["sampled"]]
            scores.append(
                {
                    j: capture.score_boxes(self.peers[j].roi_heads, outs[j]["features"], boxes)[0]
                    for j in range(len(outs))
                    if j != i
                }
            )
        return scores

    @torch.no_grad()
    def _ema_forward(self, batched_inputs, outs):
        """Every EMA teacher's FPN maps and, for each peer i, the EMA ROI predictions on peer i's
        sampled proposals (its own EMA, or every EMA for the "ensemble" target)."""
        res = []
        for k, ema in enumerate(self.ema_peers):
            if ema.training:
                ema.train(False)
            images = ema.preprocess_image(self._peer_inputs(k, batched_inputs))
            res.append({"features": ema.backbone(images.tensor)})
        if self._ema_roi:
            for i, out in enumerate(outs):
                boxes = [x.proposal_boxes for x in out["sampled"]]
                ks = range(len(self.ema_peers)) if self.ema_logit_target == "ensemble" else [i]
                res[i]["roi"] = [
                    capture.score_boxes(self.ema_peers[k].roi_heads, res[k]["features"], boxes)
                    for k in ks
                ]
        return res


def _peer_loss_name(index, key):
    """``loss_cls`` of peer 0 -> ``loss_peer0_cls``."""
    if key.startswith("loss_"):
        return f"loss_peer{index}_{key[len('loss_'):]}"
    return f"peer{index}_{key}"
