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


#: The range of every numeric key with one, in one place: ``key -> (test, rule)``. Models built
#: without a config (``HintWeighting(...)``, ``OnlineDistillationRCNN(...)``) check their
#: arguments against the same rules with :func:`check_values`.
RANGES = {
    "MODEL.KD.ROI.TEMPERATURE": (lambda v: v > 0, "must be > 0 (the logits are divided by it)"),
    "MODEL.ONLINE_KD.TEMPERATURE": (lambda v: v > 0, "must be > 0 (the logits are divided by it)"),
    "MODEL.KD.WARMUP_ITERS": (lambda v: v >= 0, "must be >= 0 (iterations; 0: no warm-up)"),
    "MODEL.ONLINE_KD.MUTUAL_WARMUP": (lambda v: v >= 0, "must be >= 0 (iterations; 0: no warm-up)"),
    "MODEL.KD.DENSE.CLS_BETA": (lambda v: v >= 0, "must be >= 0 (the focal exponent)"),
    "MODEL.KD.DENSE.SCORE_THRESH": (lambda v: 0 <= v <= 1, "must be in [0, 1] (a probability)"),
    "MODEL.KD.CROSSKD.TEACHER_CONVS": (
        lambda v: v >= 0 and v == int(v),
        "must be an integer >= 0 (the teacher's tower blocks the student's features pass)",
    ),
    "MODEL.KD.SSIM.WINDOW_SIZE": (
        lambda v: v >= 3 and v % 2 == 1,
        "must be an odd integer >= 3 (the Gaussian window is centred on a pixel), e.g. 11",
    ),
    "MODEL.KD.HINT.META_PERIOD": (lambda v: v >= 1, "must be >= 1"),
    "MODEL.KD.HINT.HIDDEN_DIM": (lambda v: v >= 1, "must be >= 1"),
    "MODEL.KD.HINT.MIN_WEIGHT": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "MODEL.KD.HINT.MOMENTUM": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "MODEL.KD.HINT.ENSEMBLE_WEIGHT": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "MODEL.KD.HINT.META_LOSS_WEIGHT": (lambda v: v >= 0, "must be >= 0"),
    "MODEL.KD.HINT.PRIOR_WEIGHT": (lambda v: v >= 0, "must be >= 0"),
    "MODEL.ONLINE_KD.EMA_DECAY": (
        lambda v: 0 <= v < 1,
        "must be in [0, 1) (1.0 would freeze the EMA teachers at their initial weights; switch "
        "them off with MODEL.ONLINE_KD.EMA_ENABLED False instead)",
    ),
}


def _problem(key, value):
    """The error line for ``key = value`` if it breaks its rule in :data:`RANGES`, else None."""
    ok, rule = RANGES[key]
    if not _is_number(value) or (isinstance(value, float) and math.isnan(value)) or not ok(value):
        return f"{key} = {value!r}: {rule}"
    return None


def check_values(values):
    """Check ``{dotted key: value}`` against :data:`RANGES` (for models built from arguments).

    Raises:
        ValueError: one line per bad value, naming the key and its rule.
    """
    errors = [p for p in (_problem(k, v) for k, v in values.items()) if p]
    if errors:
        raise ValueError("Invalid value(s):\n  - " + "\n  - ".join(errors))


def _range(errors, cfg, key, ok, rule):
    value = _get(cfg, key)
    if value is None:
        return
    if not _is_number(value) or not ok(value) or (isinstance(value, float) and math.isnan(value)):
        errors.append(f"{key} = {value!r}: {rule}")


def validate_kd_config(cfg):
    """Check the ranges of kd_det's values; raise one error naming every bad key.

    Checked: every key of :data:`RANGES` (temperatures, warm-ups, the hint-weighting settings,
    the EMA decay); every ``MODEL.KD.*WEIGHT*`` and ``MODEL.ONLINE_KD.*WEIGHT*`` >= 0;
    ``INPUT.MIX.*`` (also when mixing is off, so switching it on later cannot fail hours in).
    Keys a config does not have are skipped.

    Raises:
        ValueError: one line per bad value, with the allowed range and why.
    """
    errors = []
    for key in RANGES:
        value = _get(cfg, key)
        if value is not None and _problem(key, value):
            errors.append(_problem(key, value))
    for section in WEIGHT_SECTIONS:
        node = _get(cfg, section)
        if not isinstance(node, CfgNode):
            continue
        for key, value in _weight_keys(node, section):
            if key in RANGES:
                continue  # its own, stricter rule above
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(v >= 0 for v in values):  # NaN fails too
                errors.append(
                    f"{key} = {value!r}: loss weights must be >= 0 (a negative weight pushes the "
                    "student away from its target; 0 switches a term off)"
                )
    mode = _get(cfg, "KD_TRAINER.CHECK_IMAGES")
    if mode is not None and mode not in ("decode", "header", "off"):
        errors.append(f"KD_TRAINER.CHECK_IMAGES = {mode!r}: must be one of decode, header, off")
    _check_mix(errors, cfg)
    if errors:
        raise ValueError(
            "Invalid config value(s):\n  - " + "\n  - ".join(errors) + "\nFix them in the config "
            "file or the command-line overrides (each key is documented in "
            "kd_det/config/defaults.py)."
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
