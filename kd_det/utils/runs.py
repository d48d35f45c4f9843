"""Run ``tools/train_net.py`` as a resumable, skippable stage, and tabulate COCO results.

The concepts, shared by ``tools/demo.py`` and the method study (``projects/MethodStudy``):

* a **run** is one ``tools/train_net.py`` subprocess of a kd_det checkout (``repo``): exactly what
  a user would type, with detectron2's own logging, ``metrics.json`` and TensorBoard files in its
  output directory, and kernels capped by :data:`ISA_CAP` so machines of one kind agree;
* its **stamp** (:data:`STAMP`): the parameters that define it, with a digest of its config files
  (:func:`config_digest`), written next to its results. A later call with the same parameters
  reuses the finished run (:func:`finished_run`); an interrupted run resumes from its last
  checkpoint;
* the **schedule** of a run (:func:`schedule_opts`), and the keys that scale with it
  (:data:`SCHEDULE_RELATIVE`);
* a **table** of COCO results (:func:`markdown_table`).

The checkout is always passed in (``repo``): an installed kd_det has no repository to guess.
"""

import hashlib
import json
import os
import subprocess
import sys
import time

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: Kernel instruction-set caps for the runs of the demo and the study: CPUs of one machine kind can
#: differ in their widest vector unit (AVX2 vs AVX-512), and torch, oneDNN and MKL then pick other
#: kernels whose float results differ (dev/check_reproducibility.py). Capped at AVX2, machines
#: with AVX2 or more run the same kernels; on an AVX2 machine the caps change nothing.
ISA_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2"}  # fmt: skip
STAMP = "run_stamp.json"


def schedule_opts(iters, batch, image_size):
    """Overrides shared by demo and study runs: input size, batch, and a schedule of ``iters``
    iterations whose LR drops at 2/3 and 8/9 (steps that would coincide or fall outside the run
    are dropped, so tiny smoke runs work), with no periodic evaluation (the final one remains)."""
    steps = sorted({s for s in (int(iters * 2 / 3), int(iters * 8 / 9)) if 0 < s < iters})
    return [
        "INPUT.MIN_SIZE_TRAIN", f"({image_size},)",
        "INPUT.MIN_SIZE_TEST", str(image_size),
        "SOLVER.IMS_PER_BATCH", str(batch),
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", str(tuple(steps)),
        "SOLVER.WARMUP_ITERS", str(min(50, iters // 5)),
        "SOLVER.CHECKPOINT_PERIOD", str(max(50, iters // 4)),
        "TEST.EVAL_PERIOD", "0",
    ]  # fmt: skip


#: Keys counted in iterations whose value the study sets as a fraction of the schedule (the EMA
#: teacher starts half-way): when a setting moves to a schedule of another length, these scale
#: with it. Warm-ups such as ``MODEL.KD.WARMUP_ITERS`` stay absolute, as detectron2's
#: ``SOLVER.WARMUP_ITERS`` does.
SCHEDULE_RELATIVE = ("MODEL.ONLINE_KD.EMA_WARMUP",)


def rescale_schedule(opts, from_iters, to_iters):
    """``KEY VALUE`` overrides with every :data:`SCHEDULE_RELATIVE` value scaled by
    ``to_iters / from_iters`` (rounded to an iteration); other pairs unchanged."""
    out = list(opts)
    for i in range(0, len(out) - 1, 2):
        if out[i] in SCHEDULE_RELATIVE:
            out[i + 1] = str(int(round(float(out[i + 1]) * to_iters / from_iters)))
    return out


def schedule_relative_opts(config, iters):
    """Overrides that move ``config``'s :data:`SCHEDULE_RELATIVE` keys from its own
    ``SOLVER.MAX_ITER`` to a run of ``iters`` iterations (keys it leaves at their default are
    left alone)."""
    from kd_det.config import get_kd_cfg

    cfg, default = get_kd_cfg(), get_kd_cfg()
    cfg.merge_from_file(config)
    opts = []
    for key in SCHEDULE_RELATIVE:
        value, ref = cfg, default
        for part in key.split("."):
            value, ref = getattr(value, part), getattr(ref, part)
        if value != ref:
            opts += [key, str(value)]
    return rescale_schedule(opts, cfg.SOLVER.MAX_ITER, iters)


def config_digest(config, repo):
    """SHA-1 over a config file, its ``_BASE_`` chain and its online peers' files.

    Stamped with every run so that editing a config (or a file it inherits from) retrains the runs
    that used it instead of silently reusing results of the old settings. Paths enter the digest
    relative to the checkout ``repo``, where peer paths are resolved too (``train_net.py`` runs
    there).
    """
    import yaml

    h, todo, seen = hashlib.sha1(), [os.path.abspath(config)], set()
    while todo:
        path = todo.pop(0)
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)
        with open(path, "rb") as f:
            text = f.read()
        # Paths relative to the repository: a study resumed from another checkout of the same
        # commit (e.g. a git worktree) reuses its finished runs.
        h.update(os.path.relpath(path, repo).encode() + b"\0" + text)
        data = yaml.safe_load(text) or {}
        base = data.get("_BASE_")
        if base:
            todo.append(os.path.join(os.path.dirname(path), base))
        peers = ((data.get("MODEL") or {}).get("ONLINE_KD") or {}).get("PEERS") or []
        todo += [p if os.path.isabs(p) else os.path.join(repo, p) for p in peers]
    return h.hexdigest()


def with_config_digest(config, params, repo):
    """``params`` as :func:`train_and_evaluate` stamps them: with the digest of the config files."""
    return dict(params, config_digest=config_digest(config, repo))


def finished_run(out_dir, params):
    """The stamp of a finished run with exactly these parameters, else None."""
    stamp = os.path.join(out_dir, STAMP)
    if not (os.path.exists(stamp) and os.path.exists(os.path.join(out_dir, "final_results.json"))):
        return None
    with open(stamp) as f:
        data = json.load(f)
    return data if data.get("params") == params else None


def train_and_evaluate(
    name,
    config,
    opts,
    out_dir,
    params,
    force=False,
    quiet=False,
    env=None,
    finished_only=False,
    *,
    repo,
):
    """Train + evaluate one model through ``<repo>/tools/train_net.py`` (run from ``repo``) unless
    an identical run finished.

    Args:
        name (str): label for progress messages.
        config (str): config file.
        opts (list[str]): ``KEY VALUE`` overrides (``OUTPUT_DIR`` is added).
        out_dir (str): the run's output directory.
        params (dict): everything that defines the run; compared to decide reuse (the digest of
            the config files, :func:`config_digest`, is added).
        force (bool): retrain even if a finished run exists.
        quiet (bool): send train_net's console output to ``out_dir/stdout.txt``.
        env (dict): environment of the subprocess (e.g. ``OMP_NUM_THREADS`` for parallel runs).
        finished_only (bool): never train; return None unless an identical run finished.
        repo (str): the kd_det checkout whose ``tools/train_net.py`` trains.

    Returns:
        dict: ``{"bbox": {...}, "seconds": float, "reused": bool}`` (None: see ``finished_only``).
    """
    params = with_config_digest(config, params, repo)
    done = None if force else finished_run(out_dir, params)
    if done is not None:
        with open(os.path.join(out_dir, "final_results.json")) as f:
            bbox = json.load(f)["bbox"]
        print(f"[run] {name}: reusing the finished run in {out_dir}", flush=True)
        return {"bbox": bbox, "seconds": done["seconds"], "reused": True}
    if finished_only:
        return None
    os.makedirs(out_dir, exist_ok=True)
    resumable = os.path.exists(os.path.join(out_dir, "last_checkpoint"))
    stamp_prev = os.path.join(out_dir, STAMP + ".partial")
    same_params = False
    if resumable and os.path.exists(stamp_prev):
        with open(stamp_prev) as f:
            same_params = json.load(f).get("params") == params
    resume = ["--resume"] if (resumable and same_params and not force) else []
    with open(stamp_prev, "w") as f:
        json.dump({"params": params}, f)
    cmd = [sys.executable, os.path.join(repo, "tools", "train_net.py"), "--config-file", config]
    cmd += resume + list(opts) + ["OUTPUT_DIR", out_dir]
    env = {**ISA_CAP, **(env if env is not None else os.environ)}  # a caller's own caps win
    how = "resuming" if resume else "training"
    print(f"[run] {name}: {how}; log in {out_dir}/log.txt", flush=True)
    start = time.time()
    if quiet:
        with open(os.path.join(out_dir, "stdout.txt"), "a") as log:
            proc = subprocess.run(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, env=env)
    else:
        proc = subprocess.run(cmd, cwd=repo, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {out_dir}/log.txt")
    seconds = time.time() - start
    with open(os.path.join(out_dir, "final_results.json")) as f:
        bbox = json.load(f)["bbox"]
    with open(os.path.join(out_dir, STAMP), "w") as f:
        json.dump({"params": params, "seconds": seconds}, f)
    return {"bbox": bbox, "seconds": seconds, "reused": False}


def fmt(v, digits=1):
    """A metric for a table; NaN and COCO's -1 ("no such objects") print as n/a."""
    return "n/a" if v is None or v != v or v < 0 else f"{v:.{digits}f}"


def markdown_table(rows, metrics=METRICS, extra_cols=()):
    """``rows``: (label, bbox dict, {extra col: text}) -> a Markdown table string."""
    head = "| model | " + " | ".join(metrics + tuple(extra_cols)) + " |"
    lines = [head, "|---|" + "---|" * (len(metrics) + len(extra_cols))]
    for label, bbox, extra in rows:
        cells = [fmt(bbox.get(m)) for m in metrics] + [extra.get(c, "") for c in extra_cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
