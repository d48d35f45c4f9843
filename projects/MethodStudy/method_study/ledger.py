"""The study's ledger: one small, committed JSON record per finished run.

A run's output directory (``<output>/runs/...``) holds gigabytes of checkpoints, so it stays out of
git, and a fresh clone or a new machine has none of it. Before the ledger, the study's evidence
lived only there: a lost ``runs/`` directory lost every finished run, and ``--report-only`` then
rewrote ``results.md`` with an empty table. The ledger keeps, for each run, what the reports need
(its parameters, dev and test COCO results, AP curve, training time, end-of-training detection
loss, distillation-to-detection loss ratio, bootstrap spread of test AP), in ``<output>/ledger/``
mirroring ``runs/``. A run whose record matches its parameters is reused without its output
directory; only a run that must train needs the teacher's weights (``Study.teacher_weights``
retrains a lost teacher once, and checks it reproduces the recorded one).

Records are written atomically (temporary file, then rename), so a killed study never leaves a
half-written one.
"""

import hashlib
import json
import os
import threading

#: Fields of a record; ``params`` decides reuse, the rest feeds the reports (``kd_terms``: the
#: per-level distillation losses over training, :mod:`method_study.ssim_diagnosis`; ``cpu``: the
#: CPU model that trained it, which decides how exactly a retrain must reproduce it).
FIELDS = ("params", "dev", "seconds", "curve", "train_detection_loss_end", "kd_detection_ratio",
          "test", "test_bootstrap_std", "source", "kd_terms", "cpu")  # fmt: skip


def record_path(output, out_dir):
    """The record of the run in ``out_dir`` (a directory under ``<output>/runs``)."""
    rel = os.path.relpath(os.path.abspath(out_dir), os.path.join(os.path.abspath(output), "runs"))
    if rel.startswith(".."):
        raise ValueError(f"{out_dir} is not under {output}/runs; the ledger mirrors runs/ only")
    return os.path.join(output, "ledger", rel + ".json")


def load(path, params=None):
    """The record at ``path``; None if there is none or (given ``params``) it was made with other
    parameters."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    if params is not None and rec.get("params") != params:
        return None
    return rec


def save(path, **fields):
    """Merge ``fields`` into the record at ``path`` (created if missing), atomically."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown ledger fields {sorted(unknown)}; known: {FIELDS}")
    rec = load(path) or {}
    rec.update(fields)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A temporary file of this writer's own: two writers never rename each other's file away.
    tmp = f"{path}.tmp{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(tmp, path)
    return rec


def identity(params):
    """A short digest of a run's parameters: how a teacher is named in its students' parameters."""
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def refuse_to_shrink(path, res, count):
    """Stop before ``res`` replaces a results file at ``path`` that holds more finished runs
    (``count(results) -> int``): a study whose ``runs/`` and ledger are gone would otherwise
    overwrite its evidence with an empty table."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = count(json.load(f))
    if count(res) < old:
        raise SystemExit(
            f"Refusing to overwrite {path}: it holds {old} finished runs, this report only "
            f"{count(res)} (are runs/ and ledger/ beside it missing?). Rebuild the ledger with "
            f"`--restore-from {path}`, or pass --force to replace it."
        )


def restored_fields(results, out_rel):
    """The fields of one run as an earlier ``results.json`` holds them, or None.

    ``out_rel`` is the run's directory relative to ``runs/``: ``teacher``,
    ``dev/<family>/<trial>/seed0`` or ``final/<method>/seed<s>``. A dev trial that a method reuses
    as its seed-0 run takes its full dev results, test results and detection loss from that
    method's entry; otherwise a dev trial has its dev AP, time and curve only.
    """
    parts = out_rel.split("/")
    if parts == ["teacher"]:
        t = results.get("teacher")
        return t and {k: t.get(k) for k in ("dev", "test", "seconds", "curve")}
    if parts[0] == "final" and len(parts) == 3:
        for r in results.get("methods", {}).get(parts[1], {}).get("runs", []):
            if r.get("out") == os.path.join("runs", out_rel):
                out = {k: r.get(k) for k in ("dev", "test", "seconds", "curve")}
                out["train_detection_loss_end"] = r.get("train_detection_loss_end")
                noise = results.get("eval_noise", {}).get("student_test_AP_bootstrap_std", {})
                if parts[1] == "student" and str(r["seed"]) in noise:
                    out["test_bootstrap_std"] = noise[str(r["seed"])]
                return out
        return None
    if parts[0] == "dev" and len(parts) == 4:
        fam, trial = parts[1], parts[2]
        row = next((t for t in results.get("dev_sweep", {}).get(fam, {}).get("trials", [])
                    if t["name"] == trial and t.get("dev_AP") is not None), None)  # fmt: skip
        if row is None:
            return None
        out = {"dev": {"AP": row["dev_AP"]}, "seconds": row["seconds"], "curve": row["curve"]}
        key = f"{fam}/{trial}"
        for m in results.get("methods", {}).values():
            for r in m.get("runs", []):
                if r.get("reused_dev_trial") == key:
                    out.update(
                        dev=r["dev"],
                        test=r.get("test"),
                        train_detection_loss_end=r.get("train_detection_loss_end"),
                    )
        return out
    return None
