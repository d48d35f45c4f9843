"""``OnlineDistillationRCNN``: peer Faster R-CNNs that teach each other, plus EMA teachers.

Online distillation (Cut^nMix, MetaMixer) trains two or more peer detectors together from scratch or
from ImageNet weights instead of distilling a frozen, pre-trained teacher. Each peer is a complete
``GeneralizedRCNN`` built from its own config file (``MODEL.ONLINE_KD.PEERS``), so peers may differ
in backbone, FPN width, pixel mean/std and RGB/BGR input format. They are held in the
``nn.ModuleList`` ``peers``: the optimizer, DDP and checkpoints see all of them.

Knowledge terms, each its own loss entry (zero-weight terms are skipped entirely, nothing of them
runs):

* ``loss_peer<i>_cls``, ``loss_peer<i>_box_reg``, ``loss_peer<i>_rpn_cls``,
  ``loss_peer<i>_rpn_loc``: every peer's own detection losses on ground truth, computed exactly as
  ``GeneralizedRCNN`` computes them (with every knowledge weight at zero, each peer trains exactly
  as it would alone).
* ``loss_kd_peer<i>_fpn_<level>_from_peer<j>``: feature-level mutual learning. Peer i's FPN map is
  compared (a loss of :mod:`kd_det.modeling.losses`, e.g. SSIM) with peer j's DETACHED map
  of the same level. Where the channel counts differ, a trainable 1x1 conv maps peer i's channels
  to peer j's; these adapters live in ``kd_adapters`` under keys ``p<i>_to_p<j>_<level>`` so an
  export can drop them. As in deep mutual learning the target is detached: each direction is its
  own term that pulls only the student side, so the peers cannot meet halfway by degrading the
  stronger one's map.
* ``loss_kd_peer<i>_roi_cls_from_peer<j>`` (``LOGIT_TARGET "each"``) or
  ``loss_kd_peer<i>_roi_cls_from_peers`` (``"average"``): logit-level mutual learning on shared
  proposals. Peer i's sampled proposals (StandardROIHeads' training path) are also pooled from the
  other peers' own features and scored by their box heads under ``no_grad``; KL(target || peer i)
  of the class distributions at temperature T, times T^2. "average" uses the other peers' mean
  probabilities as one target (with two peers both options are the same).
* ``loss_kd_peer<i>_ema_fpn_<level>``, ``loss_kd_peer<i>_ema_roi_cls``,
  ``loss_kd_peer<i>_ema_roi_box``: the self-ensemble teacher (below) distilled with the offline
  terms of :class:`~kd_det.modeling.distillation.DistillationRCNN`: FPN hints from the peer's own
  EMA (same architecture, so no adapter), KL on class distributions and smooth-L1 on the
  foreground box deltas of the peer's sampled proposals. ``EMA_LOGIT_TARGET "ensemble"`` (default)
  averages the ROI predictions of every peer's EMA (a temporal AND a peer ensemble); ``"own"``
  uses only the peer's own EMA (mean teacher).

Self-ensemble teacher: a temporal EMA ("mean teacher") copy of each peer, ``ema_peers[i]``, updated
after every optimizer step with ``w_ema <- d * w_ema + (1 - d) * w`` for every parameter AND every
floating-point buffer (BatchNorm running statistics; integer counters are copied). Averaging the
statistics with the weights keeps them consistent: an earlier version copied the peer's current
statistics into the averaged weights, and its BatchNorm-FPN EMA teachers taught worse than the
peers themselves. Choices and why:

* The EMA copies hold their weights as BUFFERS (their parameters are converted at build time). So
  they are not in ``parameters()`` (no optimizer state, no gradients, DDP does not reduce them),
  but they are in ``state_dict()``: checkpoints save them under ``ema_peers.<i>.`` with exactly
  the keys of the peer, ``--resume`` restores them, and one member can be exported as a plain
  detector. DDP broadcasts buffers at construction (all ranks start equal); KDTrainer's
  ``broadcast_buffers=False`` avoids re-broadcasting them every step, which is unnecessary since
  every rank applies the same update to the same (all-reduced) weights.
* The update runs in :meth:`OnlineDistillationRCNN.update_ema`, called by a hook after each
  optimizer step (``KDTrainer.build_hooks`` registers it for any model with ``update_ema``, before
  the checkpointer and evaluation). Not inside ``forward``: forward also runs outside the optimizer
  loop in training mode (PreciseBN, validation-loss hooks, gradient accumulation) and would then
  average the same weights several times; it would also lag one step behind. Custom training loops
  call ``model.update_ema()`` after ``optimizer.step()``. Updates are counted in the saved buffer
  ``ema_updates``; EMA terms due while it is still 0 after the first iteration log a warning.
* EMA models always run in eval mode (BatchNorm with running statistics) under ``no_grad``:
  ``train()`` is overridden so ``model.train()`` never flips them back (pain point 9).
* ``EMA_WARMUP``: the EMA teaches only from this iteration on (early EMA weights are close to the
  random initialisation); it is updated from the start. A checkpoint without EMA keys (e.g. from a
  run with ``EMA_ENABLED False``) initialises each EMA from the loaded peer.

Configs. The top-level config describes the run: data (``DATASETS``, ``INPUT`` incl. the format the
loader produces), ``SOLVER``, ``TEST``, ``MODEL.DEVICE`` (applied to every peer) and
``MODEL.ONLINE_KD``. Its ``MODEL.ROI_HEADS.NUM_CLASSES`` must equal every peer's (label spaces are
checked at build). Each peer's model comes from its file plus ``MODEL.ONLINE_KD.PEER_OPTS``
(``"KEY VALUE"`` pairs for every peer; ``"peer<i>:KEY"`` for peer i only). Each peer preprocesses
with its own pixel mean/std/format; RGB<->BGR inputs are flipped for it. Initial weights: each
peer's own ``MODEL.WEIGHTS`` (e.g. ImageNet R-50) are loaded at build when
``MODEL.ONLINE_KD.LOAD_PEER_WEIGHTS`` (set it False to skip when a full checkpoint will be loaded
anyway, e.g. for ``--eval-only`` offline); the top-level ``MODEL.WEIGHTS`` is a whole-model
(all peers + EMA) checkpoint, loaded by the trainer as usual, so keep it empty for a new run.

Inference: ``forward`` in eval mode runs the member named by ``MODEL.ONLINE_KD.INFERENCE``
(``peer<i>`` or ``ema<i>``), so periodic evaluation, ``--eval-only`` and ``DefaultPredictor``
report it; :func:`evaluate_all_members` evaluates every member (``--eval-all-peers``), and
``tools/export_student.py --member`` writes any member as a plain detectron2 detector.

Memory. Every extra peer adds its parameters P four times (weights, gradients, SGD momentum and
the EMA copy; three times with ``EMA_ENABLED False``), the activations of one more detector
forward/backward, and the activations of a no-grad EMA forward. Parameter counts at the shipped
sizes: Synthetic Lite0-FPN-128 7.2 M, R18-FPN-128 15.6 M (12 classes); COCO R50-FPN 41.7 M,
R18-FPN 28.7 M (80 classes), so the COCO pair holds 4 x 70.4 M floats = 1.1 GB of
weights/gradients/momentum/EMA per GPU, plus two detectors' activations. Measured peak RSS of
building plus one SGD step at 64 px, FPN 32, batch 2, 1 thread, above the process after imports:
one plain Lite0 detector 85 MB, plain R18 181 MB; two Lite0 peers with every term and EMA
155 MB, three 202 MB (about +50-70 MB per extra Lite0 peer); Lite0 + R18 peers 285 MB, i.e. about
20 MB above the two detectors trained separately.
"""

import copy
import logging
import os
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_model
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n
from torch import nn

from kd_det.config_validation import validate_kd_config

from .distillation import _class_specific, _masked_mean, _per_level
from .losses import feature_loss_from_config

logger = logging.getLogger(__name__)

__all__ = [
    "OnlineDistillationRCNN",
    "build_peer_cfg",
    "member_cfg",
    "member_state_dict",
    "evaluate_all_members",
]

LOGIT_TARGETS = ("each", "average")
EMA_LOGIT_TARGETS = ("own", "ensemble")
_MEMBER_RE = re.compile(r"^(peer|ema)(\d+)$")
_PEER_KEY_RE = re.compile(r"^peer(\d+):(.+)$")


# ----------------------------------------------------------------------------------------------
# peer configs
# ----------------------------------------------------------------------------------------------
def _peer_opts(opts, index, num_peers):
    """``PEER_OPTS`` entries for peer ``index``: shared pairs plus its own ``peer<i>:KEY`` pairs."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(
            f"MODEL.ONLINE_KD.PEER_OPTS must hold KEY VALUE pairs; got {len(opts)} entries."
        )
    out = []
    for key, value in zip(opts[0::2], opts[1::2]):
        m = _PEER_KEY_RE.match(str(key))
        if m is None:
            out += [key, value]
            continue
        target = int(m.group(1))
        if target >= num_peers:
            raise ValueError(
                f"MODEL.ONLINE_KD.PEER_OPTS names '{key}', but there are only {num_peers} peers "
                f"(peer0..peer{num_peers - 1})."
            )
        if target == index:
            out += [m.group(2), value]
    return out


def build_peer_cfg(cfg, index):
    """Peer ``index``'s config: its file, ``PEER_OPTS``, the top-level ``MODEL.DEVICE``.

    Raises:
        FileNotFoundError: the peer's config file does not exist.
        ValueError: the peer's config is itself a distillation model.
    """
    from kd_det.config import get_kd_cfg

    peers = list(cfg.MODEL.ONLINE_KD.PEERS)
    path = peers[index]
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Peer config file '{path}' (MODEL.ONLINE_KD.PEERS[{index}]) does not exist. Paths "
            "are relative to the working directory; run from the repository root or give an "
            "absolute path."
        )
    pcfg = get_kd_cfg()
    pcfg.merge_from_file(path)
    pcfg.merge_from_list(_peer_opts(cfg.MODEL.ONLINE_KD.PEER_OPTS, index, len(peers)))
    if pcfg.MODEL.META_ARCHITECTURE in ("DistillationRCNN", "OnlineDistillationRCNN"):
        raise ValueError(
            f"Peer config '{path}' is itself a distillation model "
            f"({pcfg.MODEL.META_ARCHITECTURE}); peers must be plain detector configs "
            "(MODEL.META_ARCHITECTURE GeneralizedRCNN)."
        )
    pcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    pcfg.freeze()
    return pcfg


def _parse_member(name, num_peers, ema_enabled, key="MODEL.ONLINE_KD.INFERENCE"):
    """``"peer1"`` -> ``("peer", 1)``, validated against the model's members."""
    m = _MEMBER_RE.match(str(name))
    if m is None or int(m.group(2)) >= num_peers or (m.group(1) == "ema" and not ema_enabled):
        members = [f"peer{i}" for i in range(num_peers)]
        if ema_enabled:
            members += [f"ema{i}" for i in range(num_peers)]
        raise ValueError(f"{key}={name!r} is not a member of this model; choose from {members}.")
    return m.group(1), int(m.group(2))


def member_cfg(cfg, member=None):
    """The config of one member as a detector config of its own.

    The top-level config (data, INPUT sizes, TEST, SOLVER: what the member was trained and
    evaluated with) with ``MODEL`` replaced by the peer's model and ``INPUT.FORMAT`` by the peer's
    format (the member's weights expect it). ``ema<i>`` has peer i's config.
    """
    okd = cfg.MODEL.ONLINE_KD
    member = member or okd.INFERENCE
    _, index = _parse_member(member, len(okd.PEERS), okd.EMA_ENABLED, key="member")
    pcfg = build_peer_cfg(cfg, index)
    out = cfg.clone()
    out.defrost()
    out.MODEL = pcfg.MODEL.clone()
    out.INPUT.FORMAT = pcfg.INPUT.FORMAT
    out.defrost()  # recursive: the peer's MODEL node was frozen
    return out


def member_state_dict(model_state, member):
    """One member's weights from an ``OnlineDistillationRCNN`` state dict, prefix stripped.

    Args:
        model_state (dict): the checkpoint's ``model`` dict.
        member (str): ``peer<i>`` or ``ema<i>``.
    """
    kind, index = _parse_member(member, 1 << 30, True, key="member")
    prefix = f"{'peers' if kind == 'peer' else 'ema_peers'}.{index}."
    state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise KeyError(
            f"The checkpoint has no weights of member '{member}' (no keys starting with "
            f"'{prefix}'). Is it an OnlineDistillationRCNN checkpoint with this many peers"
            + (" and EMA_ENABLED?" if kind == "ema" else "?")
        )
    return state


def _buffer_copy(model):
    """A deep copy of ``model`` whose parameters are persistent buffers (same names), in eval mode.

    Buffers are saved and loaded with the state dict but are invisible to ``parameters()``,
    optimizers and DDP's gradient reduction: exactly what an EMA teacher needs.
    """
    ema = copy.deepcopy(model)
    for module in ema.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            del module._parameters[name]
            module.register_buffer(name, p.detach().clone())
    return ema.train(False)


def load_peer_weights(peer, weights, index):
    """Initialise a peer from its own ``MODEL.WEIGHTS`` (local path, detectron2:// URL, .pkl).

    Non-strict on purpose: ImageNet weights cover the backbone only; detectron2's checkpointer logs
    what it did not find.
    """
    logger.info(f"Initialising peer{index} from {weights}")
    DetectionCheckpointer(peer).load(weights, checkpointables=[])


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
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
            mutual_warmup (int): the mutual (peer-to-peer) weights ramp linearly from 0 to their
                value over this many iterations; 0 applies them from the first iteration.
            ema_enabled (bool): keep EMA copies of the peers (required by any ``ema_*`` weight).
            ema_decay (float): EMA decay ``d`` of :meth:`update_ema`.
            ema_warmup (int): iterations before the EMA terms start.
            ema_feature_levels (dict[str, float]): FPN level -> weight of the EMA feature hint.
            ema_logit_weight, ema_box_weight (float): weights of the EMA ROI class / box terms.
            ema_logit_target (str): "own" or "ensemble" (see the module docstring).
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
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"MODEL.ONLINE_KD.EMA_DECAY={ema_decay} must lie in [0, 1].")
        self._check_peers()
        # Trainable distillation parts under one prefix, so an export can drop them.
        self.kd_adapters = self._build_adapters()
        # Built after the peers got their initial weights: the EMA starts from them.
        self.ema_peers = nn.ModuleList(
            [_buffer_copy(p) for p in self.peers] if ema_enabled else []
        ).train(False)
        # Number of EMA updates (saved): detects a training loop that never calls update_ema().
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long, device=self.device))
        self._ema_update_seen = False
        self.register_load_state_dict_pre_hook(self._init_missing_ema)
        self.set_inference_member(inference)

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
        _parse_member(okd.INFERENCE, len(okd.PEERS), okd.EMA_ENABLED)
        peer_cfgs = [build_peer_cfg(cfg, i) for i in range(len(okd.PEERS))]
        _check_label_spaces(cfg, peer_cfgs)
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
            "feature_levels": _per_level(
                okd.FEATURE_WEIGHTS, okd.FEATURE_LEVELS, "MODEL.ONLINE_KD.FEATURE_WEIGHTS"
            ),
            "logit_weight": okd.LOGIT_WEIGHT,
            "temperature": okd.TEMPERATURE,
            "logit_target": okd.LOGIT_TARGET,
            "mutual_warmup": okd.MUTUAL_WARMUP,
            "ema_enabled": okd.EMA_ENABLED,
            "ema_decay": okd.EMA_DECAY,
            "ema_warmup": okd.EMA_WARMUP,
            "ema_feature_levels": _per_level(
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
    def _ema_roi(self):
        return bool(self.ema_logit_weight or self.ema_box_weight)

    def member_names(self):
        """``["peer0", "peer1", ..., "ema0", ...]``: everything that can be evaluated/exported."""
        names = [f"peer{i}" for i in range(len(self.peers))]
        return names + [f"ema{i}" for i in range(len(self.ema_peers))]

    def member(self, name):
        """The detector called ``name`` (``peer<i>`` or ``ema<i>``)."""
        kind, index = _parse_member(name, len(self.peers), len(self.ema_peers) > 0)
        return (self.peers if kind == "peer" else self.ema_peers)[index]

    def set_inference_member(self, name):
        """Choose the member that ``forward`` runs in eval mode."""
        _parse_member(name, len(self.peers), len(self.ema_peers) > 0)
        self.inference_member = name

    def train(self, mode=True):
        """Peers follow ``mode``; EMA teachers stay in eval mode (running BN statistics)."""
        super().train(mode)
        self.ema_peers.train(False)
        return self

    # ------------------------------------------------------------------------------------------
    # construction checks
    # ------------------------------------------------------------------------------------------
    def _check_peers(self):
        for i, fmt in enumerate(self.peer_input_formats):
            if fmt != self.input_format and {fmt, self.input_format} != {"RGB", "BGR"}:
                raise ValueError(
                    f"The data loader gives {self.input_format} images (INPUT.FORMAT) and peer{i} "
                    f"expects {fmt}; only RGB<->BGR can be converted."
                )
        levels = set(self.feature_levels) | set(self.ema_feature_levels)
        for i, peer in enumerate(self.peers):
            shapes = peer.backbone.output_shape()
            for lvl in sorted(levels):
                if lvl not in shapes:
                    raise ValueError(
                        f"MODEL.ONLINE_KD.FEATURE_LEVELS names '{lvl}', which peer{i}'s backbone "
                        f"does not output (it has {sorted(shapes)})."
                    )
        if self.logit_weight or self._ema_roi:
            for i, peer in enumerate(self.peers):
                heads = peer.roi_heads
                if not isinstance(heads, StandardROIHeads) or not hasattr(heads, "box_pooler"):
                    raise ValueError(
                        f"ROI logit distillation needs StandardROIHeads-style box heads; peer{i} "
                        f"has {type(heads).__name__}. Set LOGIT_WEIGHT / EMA_LOGIT_WEIGHT / "
                        "EMA_BOX_WEIGHT to 0."
                    )
                if heads.mask_on or heads.keypoint_on:
                    raise NotImplementedError(
                        f"ROI logit distillation supports box-only peers; peer{i} has mask or "
                        "keypoint heads. Disable them or set the ROI weights to 0."
                    )
                if heads.train_on_pred_boxes:
                    raise NotImplementedError(
                        "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES is not supported with ROI "
                        f"distillation (peer{i})."
                    )

    def _build_adapters(self):
        """1x1 convs from peer i's channels to peer j's where they differ (mutual feature terms)."""
        adapters = nn.ModuleDict()
        for i, pi in enumerate(self.peers):
            for j, pj in enumerate(self.peers):
                if i == j:
                    continue
                for lvl in self.feature_levels:
                    ci = pi.backbone.output_shape()[lvl].channels
                    cj = pj.backbone.output_shape()[lvl].channels
                    if ci != cj:
                        conv = nn.Conv2d(ci, cj, kernel_size=1)
                        nn.init.kaiming_uniform_(conv.weight, a=1)
                        nn.init.zeros_(conv.bias)
                        adapters[f"p{i}_to_p{j}_{lvl}"] = conv
        return adapters.to(self.device)

    # ------------------------------------------------------------------------------------------
    # EMA
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_ema(self):
        """``w_ema <- d * w_ema + (1 - d) * w`` for every parameter and floating-point buffer.

        Call once after every optimizer step (KDTrainer does, through a hook).
        """
        d = self.ema_decay
        for peer, ema in zip(self.peers, self.ema_peers):
            ema_state = dict(ema.named_buffers())
            tensors = list(peer.named_parameters()) + list(peer.named_buffers())
            for name, p in tensors:
                e = ema_state.get(name)
                if e is None:
                    continue
                if e.is_floating_point():
                    e.mul_(d).add_(p.detach().to(e.dtype), alpha=1.0 - d)
                else:  # counters (BatchNorm's num_batches_tracked)
                    e.copy_(p)
        self.ema_updates += 1

    def _init_missing_ema(self, module, state_dict, prefix, *args, **kwargs):
        """Loading a checkpoint without EMA weights: start each EMA from the loaded peer."""
        filled = 0
        for i, ema in enumerate(self.ema_peers):
            for name in ema.state_dict():
                key, peer_key = f"{prefix}ema_peers.{i}.{name}", f"{prefix}peers.{i}.{name}"
                if key not in state_dict and peer_key in state_dict:
                    state_dict[key] = state_dict[peer_key]
                    filled += 1
        if f"{prefix}ema_updates" not in state_dict:
            state_dict[f"{prefix}ema_updates"] = torch.zeros((), dtype=torch.long)
        if filled:
            logger.warning(
                f"The loaded weights have no EMA teachers; {filled} EMA tensors were initialised "
                "from the loaded peers."
            )

    def mutual_factor(self):
        """Linear warm-up of the mutual weights: ``min(1, iter / MUTUAL_WARMUP)``.

        Two randomly initialised peers teach each other noise at first; pulling their features and
        class distributions together from iteration 0 measurably slowed their detection losses
        (README, online distillation), so the mutual terms can start at zero and grow while the
        peers learn from ground truth.
        """
        if self.mutual_warmup <= 0:
            return 1.0
        return min(1.0, get_event_storage().iter / self.mutual_warmup)

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
        if self.peer_input_formats[index] == self.input_format:
            return batched_inputs
        return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]

    def forward(self, batched_inputs):
        """Training: every peer's losses + knowledge terms. Eval: the ``INFERENCE`` member's
        predictions (a plain ``GeneralizedRCNN`` output)."""
        if not self.training:
            _, index = _parse_member(self.inference_member, len(self.peers), True)
            return self.member(self.inference_member)(self._peer_inputs(index, batched_inputs))
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        need_roi = bool(self.logit_weight or self._ema_roi)
        losses, outs = {}, []
        for i, peer in enumerate(self.peers):
            out = _peer_forward(peer, self._peer_inputs(i, batched_inputs), gt_instances, need_roi)
            for k, v in out.pop("losses").items():
                losses[_peer_loss_name(i, k)] = v
            outs.append(out)
        for name, (values, valid, weight) in self.distillation_terms(batched_inputs, outs).items():
            losses[name] = weight * _masked_mean(values, valid)
        return losses

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
                    targets = {j: _log_probs(t, T) for j, t in peer_scores[i].items()}
                    if self.logit_target == "each":
                        for j, t_logp in targets.items():
                            terms[f"loss_kd_peer{i}_roi_cls_from_peer{j}"] = (
                                *_kl_per_image(s_scores, t_logp, counts, T),
                                self.logit_weight * mutual,
                            )
                    else:
                        t_logp = _mean_log_probs(list(targets.values()))
                        terms[f"loss_kd_peer{i}_roi_cls_from_peers"] = (
                            *_kl_per_image(s_scores, t_logp, counts, T),
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
                        t_logp = _mean_log_probs([_log_probs(s, T) for s, _ in preds])
                        terms[f"loss_kd_peer{i}_ema_roi_cls"] = (
                            *_kl_per_image(s_scores, t_logp, counts, T),
                            self.ema_logit_weight,
                        )
                    if self.ema_box_weight:
                        terms[f"loss_kd_peer{i}_ema_roi_box"] = (
                            *_box_per_image(s_scores, s_deltas, [d for _, d in preds], sampled),
                            self.ema_box_weight,
                        )
        return terms

    def _feature_term(self, s, t, adapter):
        s = s.float()
        if adapter is not None and adapter in self.kd_adapters:
            s = self.kd_adapters[adapter](s)
        t = t.float()
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        values = self.feature_loss(s, t, weight_map=None, per_image=True)
        return values, torch.ones_like(values, dtype=torch.bool)

    @torch.no_grad()
    def _peer_scores(self, outs):
        """``scores[i][j]``: peer j's class logits on peer i's sampled proposals (no gradient)."""
        scores = []
        for i, out in enumerate(outs):
            boxes = [x.proposal_boxes for x in out["sampled"]]
            scores.append(
                {
                    j: _score(self.peers[j].roi_heads, outs[j]["features"], boxes)[0]
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
                    _score(self.ema_peers[k].roi_heads, res[k]["features"], boxes) for k in ks
                ]
        return res


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _peer_loss_name(index, key):
    """``loss_cls`` of peer 0 -> ``loss_peer0_cls``."""
    if key.startswith("loss_"):
        return f"loss_peer{index}_{key[len('loss_'):]}"
    return f"peer{index}_{key}"


def _peer_forward(peer, batched_inputs, gt_instances, need_roi):
    """``GeneralizedRCNN.forward``'s training path, keeping features (and sampled proposals and
    box predictions when the ROI terms need them: StandardROIHeads' own training path, so the
    detection losses and the random sampling are unchanged)."""
    images = peer.preprocess_image(batched_inputs)
    features = peer.backbone(images.tensor)
    proposals, proposal_losses = peer.proposal_generator(images, features, gt_instances)
    out = {"features": features, "sampled": None, "predictions": None}
    if need_roi:
        heads = peer.roi_heads
        sampled = heads.label_and_sample_proposals(proposals, gt_instances)
        box_features = heads.box_pooler(
            [features[f] for f in heads.box_in_features], [x.proposal_boxes for x in sampled]
        )
        predictions = heads.box_predictor(heads.box_head(box_features))
        detector_losses = heads.box_predictor.losses(predictions, sampled)
        out.update(sampled=sampled, predictions=predictions)
    else:
        _, detector_losses = peer.roi_heads(images, features, proposals, gt_instances)
    losses = {}
    losses.update(detector_losses)
    losses.update(proposal_losses)
    out["losses"] = losses
    return out


def _score(heads, features, boxes):
    """Class logits and box deltas of ``heads`` for ``boxes`` pooled from ``features``."""
    box_features = heads.box_pooler([features[f].detach() for f in heads.box_in_features], boxes)
    scores, deltas = heads.box_predictor(heads.box_head(box_features))
    return scores.detach(), deltas.detach()


def _log_probs(scores, T):
    return F.log_softmax(scores.float() / T, dim=1)


def _mean_log_probs(log_probs):
    """log of the mean of several distributions given as log-probabilities."""
    if len(log_probs) == 1:
        return log_probs[0]
    stacked = torch.stack(log_probs)
    return torch.logsumexp(stacked, dim=0) - torch.log(torch.tensor(float(len(log_probs))))


def _kl_per_image(s_scores, t_logp, counts, T):
    """Per-image mean over proposals of KL(target || student) at temperature T, times T^2."""
    kl = F.kl_div(
        F.log_softmax(s_scores.float() / T, dim=1), t_logp, reduction="none", log_target=True
    ).sum(1) * (T * T)
    vals = [k.mean() if len(k) else kl.sum() * 0.0 for k in kl.split(counts)]
    valid = torch.tensor([c > 0 for c in counts], device=kl.device)
    return torch.stack(vals), valid


def _box_per_image(s_scores, s_deltas, t_deltas_list, sampled):
    """Smooth-L1 between the student's and the (mean) teacher deltas of each foreground proposal's
    ground-truth class, averaged per image; images without foreground are not valid."""
    counts = [len(x) for x in sampled]
    gt_classes = torch.cat([x.gt_classes for x in sampled])
    num_classes = s_scores.shape[1] - 1
    fg = (gt_classes >= 0) & (gt_classes < num_classes)
    cls = gt_classes.clamp(max=num_classes - 1)
    s_d = _class_specific(s_deltas.float(), cls)
    t_d = torch.stack([_class_specific(t.float(), cls) for t in t_deltas_list]).mean(0)
    box = F.smooth_l1_loss(s_d, t_d, beta=0.0, reduction="none").mean(1) * fg.float()
    vals, valid = [], []
    for b, f in zip(box.split(counts), fg.split(counts)):
        nf = f.sum()
        vals.append(b.sum() / nf.clamp(min=1))
        valid.append(nf > 0)
    return torch.stack(vals), torch.stack(valid)


def _check_label_spaces(cfg, peer_cfgs):
    """All peers (and the top-level config) must predict the same classes, before training."""
    paths = list(cfg.MODEL.ONLINE_KD.PEERS)
    counts = [p.MODEL.ROI_HEADS.NUM_CLASSES for p in peer_cfgs]
    for i in range(1, len(counts)):
        if counts[i] != counts[0]:
            raise ValueError(
                f"Peers must share one label space: peer0 ('{paths[0]}') predicts {counts[0]} "
                f"classes and peer{i} ('{paths[i]}') predicts {counts[i]} (MODEL.ROI_HEADS."
                "NUM_CLASSES). Online distillation matches class distributions between peers."
            )
    top = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if top != counts[0]:
        raise ValueError(
            f"The top-level config says MODEL.ROI_HEADS.NUM_CLASSES {top} but the peers predict "
            f"{counts[0]} classes; set it to the peers' value (it describes the training data's "
            "label space)."
        )


def evaluate_all_members(cfg, model, test_fn=None):
    """Evaluate every peer and EMA teacher with the run's test sets and evaluator.

    Args:
        cfg (CfgNode): the online-distillation config.
        model (OnlineDistillationRCNN): possibly DDP-wrapped, weights loaded.
        test_fn (callable): ``test_fn(cfg, model, evaluators)``, default ``KDTrainer.test``.

    Returns:
        OrderedDict: ``{"peer0": results, "peer1": results, ..., "ema0": results, ...}``. Each
        member's evaluator writes to ``OUTPUT_DIR/inference/<member>/<dataset>``.
    """
    from kd_det.engine import KDTrainer

    core = getattr(model, "module", model)
    if not isinstance(core, OnlineDistillationRCNN):
        raise ValueError(
            f"Evaluating all members needs an OnlineDistillationRCNN, got {type(core).__name__}."
        )
    test_fn = test_fn or KDTrainer.test
    previous = core.inference_member
    results = OrderedDict()
    try:
        for name in core.member_names():
            core.set_inference_member(name)
            evaluators = [
                KDTrainer.build_evaluator(
                    cfg, ds, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference", name, ds)
                )
                for ds in cfg.DATASETS.TEST
            ]
            logger.info(f"Evaluating member {name}")
            results[name] = test_fn(cfg, model, evaluators)
    finally:
        core.set_inference_member(previous)
    return results
