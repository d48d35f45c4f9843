"""``--resume`` checks what it resumes: the config a run was trained with against the new one.

detectron2's ``default_setup`` writes the merged config as ``OUTPUT_DIR/config.yaml`` at every
start, so a resume with a changed config used to overwrite the record and mix two trainings in one
set of weights (a changed ``MODEL.KD.FEATURE.LOSS`` took the hint loss from 0.047 to 0.92 with no
word). Before that file is rewritten, :func:`check_resume_config` compares the two, key by key:

* **Keys that change the model, its losses or what it learns from** -- ``MODEL.*`` (except
  :data:`NOT_THE_MODEL`), ``INPUT.*`` (sizes, augmentation, mixing) and ``DATASETS.TRAIN`` -- are
  refused with the keys named, unless the user says ``--allow-config-change`` (then logged).
* **Everything else** (``SOLVER.*`` such as a longer ``MAX_ITER``, ``TEST.*``, ``DATALOADER.*``,
  ``KD_TRAINER.*``, data paths, ``OUTPUT_DIR``...) is the schedule or the machinery: allowed and
  logged.

Keys the saved file lacks (a newer kd_det added them) count as changed only when the new value
differs from the default. The previous ``config.yaml`` is kept as ``config.yaml.bak-<time>``
whenever anything changed.
"""

import logging
import os
import shutil
import time

import yaml

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_THE_MODEL",
    "ResumeConfigError",
    "check_resume_config",
    "config_changes",
    "is_model_key",
]

#: Prefixes (or whole keys) whose change alters the model, its losses or its training data.
MODEL_KEYS = ("MODEL.", "INPUT.", "DATASETS.TRAIN")
#: ``MODEL.*`` keys that do not: the initial weights (the checkpoint replaces them), the device, and
#: the teacher check before the first step.
NOT_THE_MODEL = frozenset(
    {
        "MODEL.WEIGHTS",
        "MODEL.DEVICE",
        "MODEL.KD.TEACHER.CHECK_IMAGES",
        "MODEL.KD.TEACHER.MIN_AP",
    }
)
_SHOWN = 12


class ResumeConfigError(ValueError):
    """``--resume`` with a config whose model, losses or training data differ from the run's."""


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _plain(cfg):
    """A config as the plain data its ``config.yaml`` holds (tuples as lists)."""
    return yaml.safe_load(cfg.dump())


def is_model_key(key):
    """Whether a change of ``key`` alters the model, its losses or its training data."""
    if key in NOT_THE_MODEL:
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in MODEL_KEYS)


def config_changes(saved, cfg, defaults=None):
    """``[(key, saved value, new value)]`` of the keys whose value differs, sorted by key.

    Args:
        saved (dict): the run's ``config.yaml``, as loaded.
        cfg (CfgNode): the new config.
        defaults (CfgNode or None): the default config, for keys ``saved`` lacks.
    """
    old, new = _flatten(saved), _flatten(_plain(cfg))
    base = _flatten(_plain(defaults)) if defaults is not None else {}
    out = []
    for key in sorted(new):
        if key in old:
            if old[key] != new[key]:
                out.append((key, old[key], new[key]))
        elif key in base and base[key] != new[key]:
            out.append(
                (key, "(not in the saved config; default " + repr(base[key]) + ")", new[key])
            )
    return out


def _lines(changes):
    shown = [f"  - {k}: {v if isinstance(v, str) and v.startswith('(') else repr(v)} -> {n!r}"
             for k, v, n in changes[:_SHOWN]]  # fmt: skip
    if len(changes) > _SHOWN:
        shown.append(f"  ... and {len(changes) - _SHOWN} more")
    return "\n".join(shown)


def check_resume_config(cfg, allow_change=False, defaults=None):
    """Compare ``cfg`` with ``OUTPUT_DIR/config.yaml`` before a resume rewrites it.

    Args:
        cfg (CfgNode): the new config (its ``OUTPUT_DIR`` names the run).
        allow_change (bool): ``--allow-config-change``: log model changes instead of refusing.
        defaults (CfgNode or None): the default config (see :func:`config_changes`).

    Returns:
        list[str]: log lines describing the changes (empty when nothing changed or there is no
        saved config); the caller logs them once its logger writes to ``OUTPUT_DIR/log.txt``.

    Raises:
        ResumeConfigError: keys that alter the model changed and ``allow_change`` is False.
    """
    from kd_det.config import load_yaml

    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if not os.path.isfile(path):
        return []
    saved = load_yaml(path) or {}
    changes = config_changes(saved, cfg, defaults)
    if not changes:
        return []
    model = [c for c in changes if is_model_key(c[0])]
    schedule = [c for c in changes if not is_model_key(c[0])]
    if model and not allow_change:
        raise ResumeConfigError(
            f"--resume: the config differs from the one '{cfg.OUTPUT_DIR}' was trained with "
            f"({path}) in keys that change the model, its losses or its training data:\n"
            f"{_lines(model)}\nResuming would mix two trainings in one set of weights. Resume "
            f"with the run's own config (e.g. --config-file {path}), start a new run in another "
            "OUTPUT_DIR, or pass --allow-config-change to resume with the change (it is logged)."
        )
    aside = f"{path}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.copy2(path, aside)
    lines = []
    if model:
        lines.append(
            "--resume with --allow-config-change: keys that change the model, its losses or its "
            f"training data differ from {path} (kept as {aside}):\n{_lines(model)}"
        )
    if schedule:
        lines.append(
            f"--resume: schedule and setup keys differ from {path} (kept as {aside}):\n"
            f"{_lines(schedule)}"
        )
    return lines
