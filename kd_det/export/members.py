"""Exporting one member (``peer<i>`` or its EMA copy ``ema<i>``) of an online-distillation run as a
plain detector: its own config with the run's data and test settings, and its weights without the
``peers.<i>.`` / ``ema_peers.<i>.`` prefix (used by :func:`kd_det.export.student.export_student`).
"""

from kd_det.modeling.online.peers import build_peer_cfg, parse_member

__all__ = ["member_cfg", "member_state_dict"]


def member_cfg(cfg, member=None):
    """The config of one member as a detector config of its own.

    The top-level config (data, INPUT sizes, TEST, SOLVER: what the member was trained and
    evaluated with) with ``MODEL`` replaced by the peer's model and ``INPUT.FORMAT`` by the peer's
    format (the member's weights expect it). ``ema<i>`` has peer i's config.
    """
    okd = cfg.MODEL.ONLINE_KD
    member = member or okd.INFERENCE
    _, index = parse_member(member, len(okd.PEERS), okd.EMA_ENABLED, key="member")
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
    kind, index = parse_member(member, key="member")
    prefix = f"{'peers' if kind == 'peer' else 'ema_peers'}.{index}."
    state = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise KeyError(
            f"The checkpoint has no weights of member '{member}' (no keys starting with "
            f"'{prefix}'). Is it an OnlineDistillationRCNN checkpoint with this many peers"
            + (" and EMA_ENABLED?" if kind == "ema" else "?")
        )
    return state
