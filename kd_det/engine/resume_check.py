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
    "check_lazy_resume_config",
    "check_resume_config",
    "config_changes",
    "is_lazy_model_key",
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
    return _judge(changes, is_model_key, allow_change, path, f"'{cfg.OUTPUT_DIR}'",
                  f"--config-file {path}", "OUTPUT_DIR")  # fmt: skip


def _judge(changes, is_model, allow_change, path, run, own_config, key):
    """Refuse model changes (unless allowed), keep the saved config aside, return the log lines."""
    if not changes:
        return []
    model = [c for c in changes if is_model(c[0])]
    schedule = [c for c in changes if not is_model(c[0])]
    if model and not allow_change:
        raise ResumeConfigError(
            f"--resume: the config differs from the one {run} was trained with ({path}) in keys "
            f"that change the model, its losses or its training data:\n{_lines(model)}\n"
            "Resuming would mix two trainings in one set of weights. Resume with the run's own "
            f"config (e.g. {own_config}), start a new run in another {key}, or pass "
            "--allow-config-change to resume with the change (it is logged)."
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


#: A LazyConfig's nodes whose change alters the model, its losses or its training data.
LAZY_MODEL_KEYS = ("model.", "dataloader.train.")
#: Keys under those that do not (loading speed, the teacher check before the first step).
NOT_THE_LAZY_MODEL = frozenset(
    {
        "dataloader.train.num_workers",
        "model.kd.TEACHER.CHECK_IMAGES",
        "model.kd.TEACHER.MIN_AP",
    }
)


def is_lazy_model_key(key):
    """Whether a change of ``key`` (a dotted LazyConfig path) alters the model or its data."""
    return key not in NOT_THE_LAZY_MODEL and key.startswith(LAZY_MODEL_KEYS)


def check_lazy_resume_config(cfg, allow_change=False):
    """:func:`check_resume_config` for a LazyConfig run: ``cfg`` against the
    ``train.output_dir/config.yaml`` that detectron2's ``default_setup`` wrote when it started.

    Both sides go through detectron2's own serializer (``LazyConfig.save``) and are read back
    with kd_det's safe YAML loader, so the comparison is of the same plain data (a callable
    ``_target_`` as its dotted name). The model is ``model.*`` and ``dataloader.train.*``
    (:data:`LAZY_MODEL_KEYS`); ``train.*``, ``optimizer.*``, ``lr_multiplier.*`` and the test
    loader are the schedule and the setup.

    ``LazyConfig.save`` writes objects such as detectron2's ``ShapeSpec`` with Python tags
    (``!!python/object:...``); they are read as plain data (the tag and the fields), never
    constructed, so comparing runs no code. Returns and raises as :func:`check_resume_config`; a
    saved file that is not YAML is not compared (one log line says so).
    """
    import tempfile

    from detectron2.config import LazyConfig

    out = cfg.train.output_dir
    path = os.path.join(out, "config.yaml")
    if not os.path.isfile(path):
        return []
    try:
        saved = _read_as_data(path) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return [f"--resume: the saved config {path} was not compared with this one: {e}"]
    with tempfile.TemporaryDirectory() as tmp:
        LazyConfig.save(cfg, os.path.join(tmp, "config.yaml"))
        new = _read_as_data(os.path.join(tmp, "config.yaml")) or {}
    old, cur = _flatten(saved), _flatten(new)
    keys = sorted(k for k in set(old) | set(cur) if old.get(k, _GONE) != cur.get(k, _GONE))
    changes = [(k, old.get(k, "(not in the saved config)"), cur.get(k, "(not in this config)"))
               for k in keys]  # fmt: skip
    return _judge(changes, is_lazy_model_key, allow_change, path, f"train.output_dir '{out}'",
                  f"--config-file {path}", "train.output_dir")  # fmt: skip


_GONE = object()


class _DataLoader(yaml.SafeLoader):
    """PyYAML's safe loader that reads a Python tag as data (``{"!tag": ..., fields}``)."""


def _tag_as_data(loader, suffix, node):
    tag = "!python/" + suffix
    if isinstance(node, yaml.MappingNode):
        return {"!tag": tag, **loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return {"!tag": tag, "items": loader.construct_sequence(node, deep=True)}
    return {"!tag": tag, "value": loader.construct_scalar(node)}


_DataLoader.add_multi_constructor("tag:yaml.org,2002:python/", _tag_as_data)


def _read_as_data(path):
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_DataLoader)
