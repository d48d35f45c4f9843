"""Tables, curves and evaluation noise of :mod:`method_study.run_study` (every number names its
split)."""

import json
import os
import statistics
import subprocess
import sys
import time

from kd_det.utils.loss_balance import balance
from kd_det.utils.runs import fmt

from . import REPO, ledger, plan, plots, verdicts


def ap_curve(metrics_json):
    """``[[iteration, dev AP], ...]`` from a run's periodic evaluations (the last value logged
    for an iteration wins, so a resumed run's repeated evaluations are drawn once)."""
    by_iter = {}
    if os.path.exists(metrics_json):
        with open(metrics_json) as f:
            for line in f:
                d = json.loads(line)
                if "bbox/AP" in d and "iteration" in d:
                    by_iter[d["iteration"] + 1] = d["bbox/AP"]
    return [[k, by_iter[k]] for k in sorted(by_iter)]


def log_seconds(log_txt):
    """Training time of a run from its detectron2 ``log.txt``, over every process that wrote it.

    A resumed run's log holds one segment per process (each starts with detectron2's "Rank of
    current process" line); the run's time is the sum of each segment's first-to-last timestamp,
    so time spent before an interruption counts (work redone after it counts twice: it was
    spent). Returns None when the log has no timestamps.
    """
    import datetime

    if not os.path.exists(log_txt):
        return None
    total, first, last = 0.0, None, None
    with open(log_txt, errors="replace") as f:
        for line in f:
            if not (line.startswith("[") and line[15:16] == "]"):
                continue
            try:
                stamp = datetime.datetime.strptime(line[1:15], "%m/%d %H:%M:%S")
            except ValueError:
                continue
            if "Rank of current process" in line and first is not None:
                total += _span(first, last)
                first = None
            first = first or stamp
            last = stamp
    if first is None and total == 0.0:
        return None
    return total + (_span(first, last) if first is not None else 0.0)


def _span(first, last):
    """Seconds from ``first`` to ``last`` (timestamps without a year: a new year wraps)."""
    s = (last - first).total_seconds()
    return s + 365 * 86400 if s < 0 else s


def record_invocation(output, start, jobs, trained):
    """Keep ``<output>/invocations.json``: each ``run_study`` invocation's start, the time its
    latest run finished, and how many runs it trained, so the study's wall time over several
    invocations (a session that ends kills one) can be added up."""
    path = os.path.join(output, "invocations.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    row = {
        "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "last_finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "minutes": round((time.time() - start) / 60, 1),
        "jobs": jobs,
        "trained": trained,
    }
    rows = [r for r in rows if r["start"] != row["start"]] + [row]
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)


def invocations(output):
    path = os.path.join(output, "invocations.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def evaluate_on_test(out_dir, test_name, env=None, finished_only=False, opts=()):
    """COCO results of ``out_dir/model_final.pth`` on the test split, cached in ``out_dir/test``.

    The evaluation uses the run's own merged config (``out_dir/config.yaml``, written by detectron2
    when training started) and changes only the test set, the weights and the output directory, so
    the test split is evaluated exactly as the dev split was during training: same input size,
    same detections per image. (Rebuilding the config from its file and the method's options
    would drop the schedule's overrides, e.g. ``INPUT.MIN_SIZE_TEST``.) ``opts`` are added last
    (e.g. a dataset registration). The cache is recomputed when the weights are newer, or when
    the config or test set it was computed with changed. Returns None when ``finished_only`` and
    nothing valid is cached.
    """
    import hashlib

    config = os.path.join(out_dir, "config.yaml")
    test_dir = os.path.join(out_dir, "test")
    path = os.path.join(test_dir, "eval_results.json")
    key_path = os.path.join(test_dir, "eval_key.json")
    weights = os.path.join(out_dir, "model_final.pth")
    with open(config, "rb") as f:
        key = {"config_sha1": hashlib.sha1(f.read()).hexdigest(), "test": test_name,
               "opts": list(opts)}  # fmt: skip
    cached = None
    if os.path.exists(key_path):
        with open(key_path) as f:
            cached = json.load(f)
    fresh = (os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(weights)
             and cached == key)  # fmt: skip
    if not fresh:
        if finished_only:
            return None
        os.makedirs(test_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
               config, "--eval-only", "DATASETS.TEST", f"('{test_name}',)",
               "MODEL.WEIGHTS", weights, "OUTPUT_DIR", test_dir] + list(opts)  # fmt: skip
        with open(os.path.join(test_dir, "stdout.txt"), "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"test evaluation failed; see {test_dir}/stdout.txt")
        with open(key_path, "w") as f:
            json.dump(key, f)
    with open(path) as f:
        return json.load(f)["bbox"]


def cached_bootstrap_ap(gt_json, dets_json):
    """:func:`bootstrap_ap`, cached beside the detections (30 COCO evaluations per run are about
    a minute of CPU, which a report written while the study trains takes from it)."""
    cache = os.path.join(os.path.dirname(dets_json), "bootstrap_ap.json")
    key = [os.path.getmtime(gt_json), os.path.getmtime(dets_json)]
    if os.path.exists(cache):
        with open(cache) as f:
            c = json.load(f)
        if c.get("key") == key:
            return c["std"]
    std = bootstrap_ap(gt_json, dets_json)
    with open(cache, "w") as f:
        json.dump({"key": key, "std": std}, f)
    return std


def bootstrap_ap(gt_json, dets_json, resamples=30, seed=0):
    """Standard deviation of COCO AP over bootstrap resamples of the test images.

    Each resample draws as many images as the split has, with replacement; a drawn image keeps its
    ground truth and detections under a new image id, so pycocotools counts duplicates.
    """
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with open(gt_json) as f:
        gt = json.load(f)
    with open(dets_json) as f:
        dets = json.load(f)
    by_img_gt, by_img_dt = {}, {}
    for a in gt["annotations"]:
        by_img_gt.setdefault(a["image_id"], []).append(a)
    for d in dets:
        by_img_dt.setdefault(d["image_id"], []).append(d)
    images = gt["images"]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(images), len(images))
        new = {"images": [], "annotations": [], "categories": gt["categories"]}
        new_dets = []
        for k, i in enumerate(pick):
            im = dict(images[i], id=k + 1)
            new["images"].append(im)
            for a in by_img_gt.get(images[i]["id"], []):
                new["annotations"].append(dict(a, image_id=k + 1, id=len(new["annotations"]) + 1))
            new_dets += [dict(d, image_id=k + 1) for d in by_img_dt.get(images[i]["id"], [])]
        if not new_dets:
            values.append(0.0)
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = new
            coco.createIndex()
            ev = COCOeval(coco, coco.loadRes(new_dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        values.append(100.0 * ev.stats[0])
    return statistics.stdev(values)


def summarize(values):
    vals = [v for v in values if v is not None and v == v and v >= 0]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _balance(out_dir):
    metrics = os.path.join(out_dir or "", "metrics.json")
    return balance(metrics) if out_dir and os.path.exists(metrics) else None


def detection_loss_end(out_dir):
    """Mean training detection loss of a run's reported model over its last tenth of training
    (:mod:`kd_det.utils.loss_balance`), or None without a ``metrics.json``."""
    b = _balance(out_dir)
    return None if b is None else b["detection_end"]


def kd_detection_ratio(out_dir):
    """``[first tenth, last tenth]`` distillation-to-detection loss ratio of a run
    (:mod:`kd_det.utils.loss_balance`), or None without a ``metrics.json``."""
    b = _balance(out_dir)
    return None if b is None else [b["start"], b["end"]]


def _recorded(run, key, measure):
    """The value the run's ledger record kept (written from its metrics.json when it finished),
    else ``measure(out)`` on a finished run's directory (a run being retrained has a partial
    metrics.json, whose values would be wrong)."""
    from kd_det.utils.runs import STAMP

    kept = (run.get("record") or {}).get(key)
    out = run.get("out")
    if kept is not None or not out or not os.path.exists(os.path.join(out, STAMP)):
        return kept
    return measure(out)


def assemble(study, finals, families, preset, args):
    """The study's results as one JSON-able dict (every AP labelled with its split)."""
    res = {"preset": preset, "seeds": args.seeds, "jobs": args.jobs,
           "splits": {"dev": "val (every choice)", "test": "test (reported only)"},
           "teacher": None, "dev_sweep": {}, "methods": {}}  # fmt: skip
    t = study.results["teacher"]
    if t:
        res["teacher"] = {"dev": t["dev"], "test": t.get("test"), "seconds": t["seconds"],
                          "curve": t["curve"]}  # fmt: skip
    for fam, trials in families.items():
        entry = study.results["dev"].get(fam, {})
        runs = entry.get("trials", {})
        rows = []
        for tr in trials:
            r = runs.get(tr.name)
            rows.append({"name": tr.name, "opts": r["opts"] if r else list(tr.opts),
                         "dev_AP": r["dev"]["AP"] if r else None,
                         "seconds": r["seconds"] if r else None,
                         "curve": r.get("curve") if r else None})  # fmt: skip
        res["dev_sweep"][fam] = {
            "trials": rows,
            "pick": entry.get("pick"),
            "complete": entry.get("complete", False),
        }
    for f in finals:
        runs = study.results["final"].get(f.name, {})
        res["methods"][f.name] = {
            "label": f.label,
            "runs": [{"seed": s, "test": r.get("test"), "dev": r["dev"], "seconds": r["seconds"],
                      "curve": r["curve"], "opts": r.get("opts"),
                      "reused_dev_trial": r.get("reused_dev_trial"),
                      "train_detection_loss_end": _recorded(r, "train_detection_loss_end",
                                                            detection_loss_end),
                      "kd_detection_ratio": _recorded(r, "kd_detection_ratio",
                                                      kd_detection_ratio),
                      "out": os.path.relpath(r["out"], args.output) if r.get("out") else None}
                     for s, r in sorted(runs.items())],  # fmt: skip
        }
    res["expected_runs"] = len(finals) * len(args.seeds)
    res["finished_runs"] = sum(len(m["runs"]) for m in res["methods"].values())
    res["wall_minutes"] = None if args.report_only else (time.time() - study.t0) / 60
    trained = [t["seconds"]] if t else []
    trained += [r["seconds"] for fam in res["dev_sweep"].values() for r in fam["trials"]
                if r["seconds"]]  # fmt: skip
    trained += [r["seconds"] for m in res["methods"].values() for r in m["runs"]
                if not r["reused_dev_trial"]]  # fmt: skip
    res["compute"] = {"runs": len(trained), "run_hours": sum(trained) / 3600,
                      "invocations": invocations(args.output)}  # fmt: skip
    noise = {}
    student = study.results["final"].get("student", {})
    data = os.path.join(args.output, "data", "test.json")
    for seed, r in sorted(student.items()):
        dets = os.path.join(r["out"], "test", "inference", "synthetic_study_test",
                            "coco_instances_results.json")  # fmt: skip
        if os.path.exists(dets) and os.path.exists(data):
            noise[seed] = cached_bootstrap_ap(data, dets)
            ledger.save(ledger.record_path(args.output, r["out"]), test_bootstrap_std=noise[seed])
        elif (r.get("record") or {}).get("test_bootstrap_std") is not None:
            noise[seed] = r["record"]["test_bootstrap_std"]
    res["eval_noise"] = {"student_test_AP_bootstrap_std": noise}
    return res


def _last_quarter_change(curve):
    """Dev AP at the end minus dev AP at the first evaluation of the last quarter of training."""
    if not curve or len(curve) < 2:
        return None
    end_it, end_ap = curve[-1]
    start = [ap for it, ap in curve if it >= 0.75 * (end_it + 1) - 1]
    return end_ap - start[0] if len(start) > 1 else None


def regime_checks(res):
    """The converged-regime criteria of the study, computed from its own runs.

    * teacher: its dev AP over the last quarter of its schedule (it should have stopped rising);
    * student alone: the change of its dev AP over the last quarter of training, per seed, against
      the seed-to-seed spread of its final dev AP (a plateau: change < spread);
    * gap: teacher minus student-alone mean AP, the criterion on **dev** (the regime is a choice,
      and choices are made on dev: at least 8 AP), and on test for information.
    """
    out = {}
    t = res.get("teacher") or {}
    if t.get("curve"):
        out["teacher_last_quarter_change"] = _last_quarter_change(t["curve"])
    runs = res["methods"].get("student", {}).get("runs", [])
    changes = [_last_quarter_change(r.get("curve")) for r in runs]
    out["student_last_quarter_change"] = [c for c in changes if c is not None]
    _, spread = summarize([r["dev"]["AP"] for r in runs])
    out["student_dev_seed_std"] = spread if len(runs) > 1 else None
    if out["student_last_quarter_change"] and out["student_dev_seed_std"] is not None:
        out["student_plateau"] = all(
            abs(c) < out["student_dev_seed_std"] for c in out["student_last_quarter_change"]
        )
    for split in ("dev", "test"):
        t_ap = (t.get(split) or {}).get("AP")
        s_ap = summarize([(r.get(split) or {}).get("AP") for r in runs])[0]
        if t_ap is not None and s_ap is not None:
            out[f"gap_{split}_AP"] = t_ap - s_ap
    return out


def finished_count(res):
    """Finished dev trials and final runs in a results dict (the teacher counts as one)."""
    trials = sum(t.get("dev_AP") is not None for e in res.get("dev_sweep", {}).values()
                 for t in e.get("trials", []))  # fmt: skip
    return bool(res.get("teacher")) + trials + res.get("finished_runs", 0)


def drops_methods(res, output):
    """Whether ``<output>/results.json`` reports methods that ``res`` does not (a ``--families``
    subset of the study)."""
    path = os.path.join(output, "results.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return bool(set(json.load(f).get("methods", {})) - set(res["methods"]))


def write_all(res, output, allow_fewer=False, teacher_label=plan.TEACHER_LABEL):
    """Write the reports; refuse to replace a results.json that holds more finished runs than
    ``res`` (a study whose ``runs/`` and ledger are gone would otherwise overwrite its evidence
    with an empty table) unless ``allow_fewer``."""
    os.makedirs(output, exist_ok=True)
    if not allow_fewer:
        ledger.refuse_to_shrink(os.path.join(output, "results.json"), res, finished_count)
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(output, "dev_sweep.md"), "w") as f:
        f.write(dev_sweep_markdown(res))
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(results_markdown(res, teacher_label))
    plots.plot_ap_curves(res, os.path.join(output, "ap_curves.png"))
    plots.plot_dev_sweep(res, os.path.join(output, "dev_sweep.png"))


def dev_sweep_markdown(res):
    lines = ["Dev sweep (split: dev = generated `val`; seed 0; AP at the end of training; "
             "**bold** = the family's pick)", "",
             "| family | trial | options | dev AP |", "|---|---|---|---|"]  # fmt: skip
    for fam, e in res["dev_sweep"].items():
        for t in e["trials"]:
            mark = "**" if t["name"] == e["pick"] else ""
            opts = " ".join(o.replace("MODEL.KD.", "").replace("MODEL.ONLINE_KD.", "ONLINE.")
                            for o in t["opts"])  # fmt: skip
            lines.append(f"| {fam} | {mark}{t['name']}{mark} | `{opts}` | {fmt(t['dev_AP'])} |")
        if not e["complete"]:
            lines.append(f"| {fam} | (partial: not every trial finished; no pick yet) | | |")
    return "\n".join(lines) + "\n"


def versus_student(runs, student_runs, name):
    """Mean test-AP difference to the student alone and its standard error (Welch), with a mark
    when the difference exceeds twice its standard error."""
    if name == "student":
        return ""
    diff, se = verdicts.welch(verdicts.aps_on_test(runs), verdicts.aps_on_test(student_runs))
    if diff is None:
        return ""
    if se is None:
        return f"{diff:+.1f}"
    mark = " *" if se > 0 and abs(diff) > 2 * se else ""
    return f"{diff:+.1f} +- {se:.1f}{mark}"


def results_markdown(res, teacher_label=plan.TEACHER_LABEL):
    t = res.get("teacher") or {}
    t_ap = (t.get("test") or {}).get("AP")
    s_runs = res["methods"].get("student", {}).get("runs", [])
    s_ap = summarize([(r["test"] or {}).get("AP") for r in s_runs])[0]
    lines = ["Test split (never used for a choice); mean +- std over seeds.", "",
             "| method | test AP | vs student alone | verdict | test AP50 | gap closed | dev AP "
             "| seeds | min / run | train det. loss, end |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    if t:
        t_ap50 = (t.get("test") or {}).get("AP50")
        lines.append(f"| {teacher_label} | {fmt(t_ap)} | | | {fmt(t_ap50)} | | "
                     f"{fmt(t['dev']['AP'])} | 1 | {t['seconds'] / 60:.0f} | |")  # fmt: skip
    for name, m in res["methods"].items():
        runs = m["runs"]
        ap, sd = summarize([(r["test"] or {}).get("AP") for r in runs])
        ap50, sd50 = summarize([(r["test"] or {}).get("AP50") for r in runs])
        dev, _ = summarize([r["dev"]["AP"] for r in runs])
        gap = ""
        if None not in (ap, t_ap, s_ap) and t_ap > s_ap and name != "student":
            gap = f"{(ap - s_ap) / (t_ap - s_ap):+.0%}"
        minutes = summarize([r["seconds"] / 60 for r in runs])[0]
        det_loss = summarize([r.get("train_detection_loss_end") for r in runs])[0]
        cell = lambda a, s: "n/a" if a is None else f"{a:.1f} +- {s:.1f}"  # noqa: E731
        v = "" if name == "student" else verdicts.method_verdict(runs, s_runs)
        lines.append(f"| {m['label']} | {cell(ap, sd)} | {versus_student(runs, s_runs, name)} | "
                     f"{v} | {cell(ap50, sd50)} | {gap} | "
                     f"{fmt(dev)} | {len(runs)} | {fmt(minutes, 0)} | "
                     f"{fmt(det_loss, 2)} |")  # fmt: skip
    lines += ["", "vs student alone: difference of mean test AP +- its standard error; * = more "
              "than two standard errors. Verdict: pays off / hurts beyond two standard errors, "
              "else no effect shown. Train det. loss, end: the reported model's detection losses "
              "(no distillation term; peer 0 of an online pair) over the last tenth of training, "
              "mean over seeds: above the student alone's, a method fits the training data less "
              "well (underfits); below it, better."]  # fmt: skip
    found = verdicts.answers(res)
    if found:
        lines += ["", "The study's questions (test split):"] + found
    picked = verdicts.selection_check(res)
    if picked:
        lines += [""] + picked
    noise = res.get("eval_noise", {}).get("student_test_AP_bootstrap_std", {})
    if noise:
        vals = ", ".join(f"{v:.2f}" for v in noise.values())
        lines += ["", f"Evaluation noise: the bootstrap std of the student's test AP over test "
                  f"images is {vals} AP (one value per seed)."]  # fmt: skip
    checks = regime_checks(res)
    head = len(lines)
    if checks:
        t_change = checks.get("teacher_last_quarter_change")
        if t_change is not None:
            lines.append(f"- teacher: dev AP changed by {t_change:+.1f} over the last quarter of "
                         "its schedule;")  # fmt: skip
        if checks.get("student_last_quarter_change"):
            ch = ", ".join(f"{c:+.1f}" for c in checks["student_last_quarter_change"])
            sd = checks.get("student_dev_seed_std")
            verdict = ""
            if "student_plateau" in checks:
                verdict = " (a plateau)" if checks["student_plateau"] else " (**not** a plateau)"
            lines.append(f"- student alone: dev AP changed by {ch} over the last quarter (per "
                         f"seed); seed spread of its final dev AP {fmt(sd)}{verdict};")  # fmt: skip
        if checks.get("gap_dev_AP") is not None:
            ok = "meets" if checks["gap_dev_AP"] >= 8 else "**misses**"
            line = (
                f"- teacher-student gap on dev: {checks['gap_dev_AP']:.1f} AP ({ok} the 8 AP "
                "the study needs)"
            )
            if checks.get("gap_test_AP") is not None:
                line += f"; on test: {checks['gap_test_AP']:.1f} AP"
            lines.append(line + ".")
    if len(lines) > head:
        lines[head:head] = ["", 'Regime checks (README, "Method study"):']
    p = res["preset"]
    lines += [
        "",
        f"Data: {p['num_train']} train / {p['num_dev']} dev / {p['num_test']} test "
        f"generated scenes of {p['image_size']} px; students {p['iters']} iterations, "
        f"teacher {p['teacher_iters']}, batch {p['batch']}; seeds {res['seeds']}.",
    ]
    if res.get("wall_minutes"):
        lines.append(f"This invocation took {res['wall_minutes']:.0f} min at --jobs {res['jobs']}.")
    c = res.get("compute")
    if c and c["runs"]:
        inv = c.get("invocations") or []
        jobs = max([r["jobs"] for r in inv] + [res["jobs"]])
        lines.append(f"Cost: the {c['runs']} runs trained so far took {c['run_hours']:.1f} h of "
                     f"training summed over runs (from their logs, resumes included), so at "
                     f"--jobs {jobs} at least {c['run_hours'] / jobs:.1f} h of "
                     "wall time.")  # fmt: skip
        if inv:
            lines.append(f"Invocations recorded in invocations.json: {len(inv)}, "
                         f"{sum(r['minutes'] for r in inv) / 60:.1f} h from their starts to their "
                         "last finished runs.")  # fmt: skip
    if res["finished_runs"] < res["expected_runs"]:
        lines.append(f"**Partial**: {res['finished_runs']} of {res['expected_runs']} final runs "
                     "had finished when this table was written.")  # fmt: skip
    return "\n".join(lines) + "\n"
