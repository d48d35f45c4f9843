"""Range checks of kd_det's config values, run before any model is built.

yacs checks that a key exists and keeps its type, not that its value makes sense: a temperature of
0 divides the logits by zero and gives NaN at the first step, a negative weight makes a hint push
the student *away* from its teacher, and ``INPUT.MIX.PROB 1.5`` is only noticed (if ever) when
mixing is switched on. :func:`validate_kd_config` checks them all at once and names every bad key;
it is called by ``KDTrainer`` and by the distillation models' ``from_config``.
"""

import math

from detectron2.config import CfgNode

#: Sections whose ``*WEIGHT*`` keys are loss weights (must be >= 0).
WEIGHT_SECTIONS = ("MODEL.KD", "MODEL.ONLINE_KD")


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return None
        node = node[part]
    return node


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _weight_keys(node, prefix):
    """(dotted key, value) of every numeric ``*WEIGHT*`` key under ``node`` (lists included)."""
    for key, value in node.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, CfgNode):
            yield from _weight_keys(value, dotted)
        elif "WEIGHT" in key and (
            _is_number(value)
            or (isinstance(value, (list, tuple)) and value and all(map(_is_number, value)))
        ):
            yield dotted, value


def _range(errors, cfg, key, ok, rule):
    value = _get(cfg, key)
    if value is None:
        return
    if not _is_number(value) or not ok(value) or (isinstance(value, float) and math.isnan(value)):
        errors.append(f"{key} = {value!r}: {rule}")


def validate_kd_config(cfg):
    """Check the ranges of kd_det's values; raise one error naming every bad key.

    Checked: temperatures > 0; every ``MODEL.KD.*WEIGHT*`` and ``MODEL.ONLINE_KD.*WEIGHT*`` >= 0;
    ``INPUT.MIX.*`` (also when mixing is off, so switching it on later cannot fail hours in);
    warm-up lengths >= 0; the EMA decay in [0, 1]. Keys a config does not have are skipped.

    Raises:
        ValueError: one line per bad value, with the allowed range and why.
    """
    errors = []
    for key in ("MODEL.KD.ROI.TEMPERATURE", "MODEL.ONLINE_KD.TEMPERATURE"):
        _range(errors, cfg, key, lambda v: v > 0, "must be > 0 (the logits are divided by it)")
    for section in WEIGHT_SECTIONS:
        node = _get(cfg, section)
        if not isinstance(node, CfgNode):
            continue
        for key, value in _weight_keys(node, section):
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(v >= 0 for v in values):  # NaN fails too
                errors.append(
                    f"{key} = {value!r}: loss weights must be >= 0 (a negative weight pushes the "
                    "student away from its target; 0 switches a term off)"
                )
    for key in ("MODEL.KD.WARMUP_ITERS", "MODEL.ONLINE_KD.MUTUAL_WARMUP"):
        _range(errors, cfg, key, lambda v: v >= 0, "must be >= 0 (iterations; 0: no warm-up)")
    _range(errors, cfg, "MODEL.KD.HINT.META_PERIOD", lambda v: v >= 1, "must be >= 1")
    _range(errors, cfg, "MODEL.ONLINE_KD.EMA_DECAY", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    mode = _get(cfg, "KD_TRAINER.CHECK_IMAGES")
    if mode is not None and mode not in ("decode", "header", "off"):
        errors.append(f"KD_TRAINER.CHECK_IMAGES = {mode!r}: must be one of decode, header, off")
    _check_mix(errors, cfg)
    if errors:
        raise ValueError(
            "Invalid config value(s):\n  - " + "\n  - ".join(errors) + "\nFix them in the config "
            "file or the command-line overrides (each key is documented in kd_det/config/defaults.py)."
        )


def _check_mix(errors, cfg):
    if _get(cfg, "INPUT.MIX") is None:
        return
    from kd_det.data.mix import BOX_RULES, MIX_STRATEGY_REGISTRY

    mix = cfg.INPUT.MIX
    if mix.TYPE not in MIX_STRATEGY_REGISTRY:
        names = ", ".join(k for k, _ in MIX_STRATEGY_REGISTRY)
        errors.append(f"INPUT.MIX.TYPE = {mix.TYPE!r}: must be one of {names}")
    if mix.BOX_RULE not in BOX_RULES:
        errors.append(
            f"INPUT.MIX.BOX_RULE = {mix.BOX_RULE!r}: must be one of {', '.join(BOX_RULES)}"
        )
    unit = "must be in [0, 1]"
    _range(errors, cfg, "INPUT.MIX.PROB", lambda v: 0 <= v <= 1, f"{unit} (a probability)")
    _range(errors, cfg, "INPUT.MIX.ALPHA", lambda v: v > 0, "must be > 0 (Beta(alpha, alpha))")
    _range(
        errors,
        cfg,
        "INPUT.MIX.NUM_PATCHES",
        lambda v: v >= 1 and v == int(v),
        "must be an integer >= 1",
    )
    _range(errors, cfg, "INPUT.MIX.MIN_VISIBLE", lambda v: 0 <= v <= 1, f"{unit} (a fraction)")
    _range(errors, cfg, "INPUT.MIX.MIN_BOX_SIZE", lambda v: v >= 0, "must be >= 0 (pixels)")
    _range(errors, cfg, "INPUT.MIX.PARTNER_CACHE_SIZE", lambda v: v >= 0, "must be >= 0")
    _range(errors, cfg, "INPUT.MIX.CLEAN_TAIL", lambda v: 0 <= v < 1, "must be in [0, 1)")
