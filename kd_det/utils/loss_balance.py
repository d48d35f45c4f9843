"""How large a run's distillation terms are next to its detection losses (``metrics.json``).

A distillation weight means something only relative to the detection losses it is added to, so
what carries over between datasets is the *balance* a weight produced, not its number. The
concepts here:

* **ratio** of a logged row: the sum of the ``loss_kd_*`` terms over the sum of the detection
  ``loss_*`` terms (:data:`AUXILIARY` losses, such as the meta-weight network's
  ``loss_hint_meta``, count as neither);
* **windows**: the first, middle and last fraction of a run's logged training rows, over which
  :func:`balance` averages the ratio;
* **detection loss at the end** of the model a run reports (peer 0 of an online run), which tells
  underfitting from overfitting.

``tools/loss_balance.py`` prints :func:`table` for a user's runs; the method study
(``projects/MethodStudy``) records the same numbers for each of its runs.
"""

import glob
import json
import os
import statistics

__all__ = ["AUXILIARY", "balance", "detection_terms", "loss_rows", "member_detection_loss",
           "ratio", "study_runs", "table"]  # fmt: skip


def loss_rows(metrics_json):
    """The training rows of a ``metrics.json``: ``(iteration, {loss name: value})``, in order; a
    resumed run's repeated iterations keep their last value."""
    by_iter = {}
    with open(metrics_json) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            losses = {k: v for k, v in d.items() if k.startswith("loss_")}
            if losses and "iteration" in d:
                by_iter[d["iteration"]] = losses
    return sorted(by_iter.items())


#: Logged losses that train a side network only, not the detector: hint-dynamic weighting's
#: meta-weight objective. They count as neither distillation nor detection.
AUXILIARY = ("loss_hint_meta",)


def detection_terms(losses):
    """``{name: value}`` of a row's detection losses: neither ``loss_kd_*`` nor auxiliary."""
    return {k: v for k, v in losses.items() if not k.startswith("loss_kd_") and k not in AUXILIARY}


def ratio(losses):
    """Distillation terms over detection terms for one row (None without detection terms)."""
    kd = sum(v for k, v in losses.items() if k.startswith("loss_kd_"))
    det = sum(detection_terms(losses).values())
    return kd / det if det > 0 else None


def member_detection_loss(losses):
    """The detection losses (no ``loss_kd_*`` or auxiliary term) of the model a run reports,
    summed: an online run logs every peer's (``loss_peer<i>_*``), and peer 0 is the one it
    evaluates by default, so its sum compares with a single detector's."""
    det = detection_terms(losses)
    if any(k.startswith("loss_peer") for k in det):
        det = {k: v for k, v in det.items() if k.startswith("loss_peer0_")}
    return sum(det.values())


def balance(metrics_json, window=0.1):
    """``{"start", "middle", "end": mean ratio, "largest": (term, mean value at the end),
    "detection_end": mean detection loss of the reported model at the end,
    "iterations": last iteration}`` of one run, or None when it logged no training row.

    ``detection_end`` tells underfitting from overfitting: a method whose students end with a
    higher detection loss than the student alone's fits the training data less well."""
    rows = loss_rows(metrics_json)
    if not rows:
        return None
    n = max(1, int(round(window * len(rows))))
    mid = len(rows) // 2
    windows = {"start": rows[:n], "middle": rows[mid - n // 2 : mid - n // 2 + n],
               "end": rows[-n:]}  # fmt: skip
    out = {"iterations": rows[-1][0] + 1}
    for name, part in windows.items():
        vals = [r for r in (ratio(losses) for _, losses in part) if r is not None]
        out[name] = statistics.mean(vals) if vals else None
    out["detection_end"] = statistics.mean(member_detection_loss(v) for _, v in windows["end"])
    kd_terms = {k for _, losses in windows["end"] for k in losses if k.startswith("loss_kd_")}
    means = {k: statistics.mean(losses.get(k, 0.0) for _, losses in windows["end"])
             for k in kd_terms}  # fmt: skip
    out["largest"] = max(means.items(), key=lambda kv: kv[1]) if means else None
    return out


def study_runs(study_dir):
    """``[(label, run dir)]`` for every dev trial of a study, the family's pick marked with *."""
    picks = {}
    results = os.path.join(study_dir, "results.json")
    if os.path.exists(results):
        with open(results) as f:
            sweep = json.load(f).get("dev_sweep", {})
        picks = {fam: e.get("pick") for fam, e in sweep.items()}
    out = []
    for path in sorted(glob.glob(os.path.join(study_dir, "runs", "dev", "*", "*", "seed0"))):
        trial_dir = os.path.dirname(path)
        fam, trial = os.path.basename(os.path.dirname(trial_dir)), os.path.basename(trial_dir)
        mark = " *" if picks.get(fam) == trial else ""
        out.append((f"{fam}/{trial}{mark}", path))
    return out


def table(labelled, window=0.1):
    """A Markdown table of :func:`balance` for ``[(label, run directory)]``: one row per run, runs
    without training rows named as such."""
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| run | iterations | kd / detection: start | middle | end | largest kd term at end |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for label, run in labelled:
        path = os.path.join(run, "metrics.json")
        b = balance(path, window) if os.path.exists(path) else None
        if b is None:
            lines.append(f"| {label} | (no training rows in {path}) | | | | |")
            continue
        big = "none" if b["largest"] is None else f"{b['largest'][0]} {b['largest'][1]:.3f}"
        lines.append(f"| {label} | {b['iterations']} | {fmt(b['start'])} | {fmt(b['middle'])} | "
                     f"{fmt(b['end'])} | {big} |")  # fmt: skip
    return "\n".join(lines) + "\n"
