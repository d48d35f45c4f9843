"""Peers of online distillation: their configs, initial weights, label spaces and members.

Each peer of :class:`~kd_det.modeling.meta_arch.OnlineDistillationRCNN` is a plain detector
built from its own config file (``MODEL.ONLINE_KD.PEERS``) plus ``MODEL.ONLINE_KD.PEER_OPTS``
(``"KEY VALUE"`` pairs for every peer; ``"peer<i>:KEY"`` for peer i only). A *member* is anything
that can be evaluated or exported as a plain detector: ``peer<i>`` or its EMA copy ``ema<i>``.
"""

import logging
import re

from torch import nn

from kd_det.checkpoint import SafeDetectionCheckpointer

from ..common import build_adapter, build_sub_model_cfg, check_box_heads

logger = logging.getLogger(__name__)

__all__ = [
    "build_mutual_adapters",
    "build_peer_cfg",
    "check_peers",
    "check_label_spaces",
    "load_peer_weights",
    "parse_member",
]

_MEMBER_RE = re.compile(r"^(peer|ema)(\d+)$")
_PEER_KEY_RE = re.compile(r"^peer(\d+):(.+)$")


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
    peers = list(cfg.MODEL.ONLINE_KD.PEERS)
    pcfg = build_sub_model_cfg(
        peers[index],
        _peer_opts(cfg.MODEL.ONLINE_KD.PEER_OPTS, index, len(peers)),
        cfg.MODEL.DEVICE,
        what="Peer config file",
        key=f"MODEL.ONLINE_KD.PEERS[{index}]",
        not_plain_hint="peers must be plain detector configs (MODEL.META_ARCHITECTURE "
        "GeneralizedRCNN).",
    )
    pcfg.freeze()
    return pcfg


def parse_member(name, num_peers=None, ema_enabled=True, key="MODEL.ONLINE_KD.INFERENCE"):
    """``"peer1"`` -> ``("peer", 1)``, validated against the model's members (any index when
    ``num_peers`` is None, e.g. for a checkpoint whose peer count is not known)."""
    m = _MEMBER_RE.match(str(name))
    if (
        m is None
        or (num_peers is not None and int(m.group(2)) >= num_peers)
        or (m.group(1) == "ema" and not ema_enabled)
    ):
        if num_peers is None:
            members = "peer<i> or ema<i>"
        else:
            members = [f"peer{i}" for i in range(num_peers)]
            if ema_enabled:
                members += [f"ema{i}" for i in range(num_peers)]
        raise ValueError(f"{key}={name!r} is not a member of this model; choose from {members}.")
    return m.group(1), int(m.group(2))


def load_peer_weights(peer, weights, index):
    """Initialise a peer from its own ``MODEL.WEIGHTS`` (local path, detectron2:// URL, .pkl).

    Non-strict on purpose: ImageNet weights cover the backbone only; detectron2's checkpointer logs
    what it did not find. Files are read as data only (no pickled code runs).
    """
    logger.info(f"Initialising peer{index} from {weights}")
    SafeDetectionCheckpointer(peer).load(weights, checkpointables=[])


def check_label_spaces(cfg, peer_cfgs):
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


def check_peers(peers, levels, roi_fix=None):
    """Raise unless every peer outputs the FPN ``levels`` the feature terms read and, when ROI
    terms are on (``roi_fix``: how to turn them off), has box heads they support."""
    for i, peer in enumerate(peers):
        shapes = peer.backbone.output_shape()
        for lvl in sorted(levels):
            if lvl not in shapes:
                raise ValueError(
                    f"MODEL.ONLINE_KD.FEATURE_LEVELS names '{lvl}', which peer{i}'s backbone "
                    f"does not output (it has {sorted(shapes)})."
                )
        if roi_fix is not None:
            check_box_heads(peer, f"peer{i}", roi_fix)


def build_mutual_adapters(peers, levels):
    """1x1 convs ``p<i>_to_p<j>_<level>`` from peer i's channels to peer j's where they differ."""
    adapters = nn.ModuleDict()
    for i, pi in enumerate(peers):
        for j, pj in enumerate(peers):
            if i == j:
                continue
            for lvl in levels:
                ci = pi.backbone.output_shape()[lvl].channels
                cj = pj.backbone.output_shape()[lvl].channels
                if ci != cj:
                    adapters[f"p{i}_to_p{j}_{lvl}"] = build_adapter(ci, cj)
    return adapters
