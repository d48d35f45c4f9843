#!/usr/bin/env python
"""Train every kd_det method on the same student, schedule and seeds; tabulate and plot COCO AP.

One command, resumable: each (method, seed) run lives in ``<output>/runs/<method>/seed<k>`` and is
skipped when it already finished with the same parameters (an interrupted run resumes from its last
checkpoint). The teacher is trained once (or given with ``--teacher-weights``) and shared by all
methods. Writes ``<output>/results.json``, ``<output>/results.md`` (mean +- std over seeds of AP,
AP50, APs/m/l, and the fraction of the teacher-student gap each method closes) and
``<output>/results.png``.

    python tools/run_study.py --quick                       # CPU-sized (see README for the time)
    python tools/run_study.py --methods student ssim --seeds 0 1 2
    python tools/run_study.py --list                        # the methods and their overrides
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SYN = os.path.join(REPO, "configs", "Synthetic")

STUDENT = os.path.join(SYN, "faster_rcnn_lite0_FPN.yaml")
TEACHER = os.path.join(SYN, "faster_rcnn_lite2_FPN.yaml")
KD_SSIM = os.path.join(SYN, "distill_lite2_to_lite0_ssim.yaml")


def _mix(kind):
    return ["INPUT.MIX.ENABLED", "True", "INPUT.MIX.TYPE", kind, "INPUT.MIX.PROB", "0.5",
            "INPUT.MIX.PARTNER_CACHE_SIZE", "8"]  # fmt: skip


#: method -> (label, config file, overrides, needs the teacher)
METHODS = {
    "student": ("student alone", STUDENT, [], False),
    "mse": ("+ MSE hints (P2-P6)", KD_SSIM, ["MODEL.KD.FEATURE.LOSS", "mse"], True),
    "ssim": ("+ SSIM hints (P2-P6)", KD_SSIM, [], True),
    "multilevel": (
        "+ multi-level (SSIM P2-P6, res2, RPN, ROI cls/box)",
        os.path.join(SYN, "distill_lite2_to_lite0_multilevel.yaml"),
        [],
        True,
    ),
    "ssim_std": (
        "+ SSIM hints, standardized maps (range 6)",
        KD_SSIM,
        ["MODEL.KD.FEATURE.RANGE_POLICY", "standardize", "MODEL.KD.SSIM.DATA_RANGE", "6.0"],
        True,
    ),
    "mixup": ("student + MixUp", STUDENT, _mix("mixup"), False),
    "cutmix": ("student + CutMix", STUDENT, _mix("cutmix"), False),
    "cutnmix": ("student + Cut^nMix", STUDENT, _mix("cutnmix"), False),
    "ssim_mixup": ("+ SSIM hints + MixUp", KD_SSIM, _mix("mixup"), True),
    "ssim_cutmix": ("+ SSIM hints + CutMix", KD_SSIM, _mix("cutmix"), True),
    "ssim_cutnmix": ("+ SSIM hints + Cut^nMix", KD_SSIM, _mix("cutnmix"), True),
}
#: What ``tools/run_study.py`` trains without ``--methods``: every kd_det method on the student, and
#: the student with Cut^nMix alone (the baseline of the online runs with Cut^nMix).
DEFAULT_METHODS = ("student", "mse", "ssim", "multilevel", "ssim_dynamic", "ssim_cutmix",
                   "ssim_cutnmix", "cutnmix", "online", "online_cutnmix")  # fmt: skip
QUICK = dict(num_train=500, num_val=100, image_size=160, teacher_iters=400, iters=200, batch=8)
FULL = dict(num_train=2000, num_val=300, image_size=192, teacher_iters=1500, iters=1000, batch=8)


def register_method(name, label, config, opts, needs_teacher):
    """Add a method (used by later modules: online peers, dynamic hint weights)."""
    METHODS[name] = (label, config, list(opts), needs_teacher)


def _optional_methods():
    dyn = os.path.join(SYN, "distill_lite2_to_lite0_ssim_dynamic.yaml")
    if os.path.exists(dyn):
        register_method("ssim_dynamic", "+ SSIM hints, dynamic hint weights", dyn, [], True)
    online = os.path.join(SYN, "online_lite0_x2.yaml")
    if os.path.exists(online):
        register_method("online", "online: 2 Lite0 peers (no teacher)", online, [], False)
        register_method(
            "online_cutnmix", "online: 2 Lite0 peers + Cut^nMix", online, _mix("cutnmix"), False
        )


def parse_args(argv=None):
    _optional_methods()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(REPO, "study"))
    p.add_argument("--quick", action="store_true", help="CPU-sized schedule (default: full)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"default: {' '.join(DEFAULT_METHODS)}; "
                        f"any of {sorted(METHODS)}")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--teacher-weights", default="", help="reuse a trained teacher checkpoint")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    for k in FULL:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tabulate the runs that finished (e.g. while a study runs)",
    )
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side, each with cores/jobs threads")  # fmt: skip
    p.add_argument(
        "--opts",
        nargs="+",
        default=[],
        help="KEY VALUE overrides added to every run but the teacher",
    )
    return p.parse_args(argv)


def _file_id(path):
    """Path, size and mtime of the teacher's weights: a retrained teacher retrains its students."""
    st = os.stat(path)
    return [path, st.st_size, int(st.st_mtime)]


def summarize(values):
    vals = [v for v in values if v is not None and v == v and v >= 0]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def main(argv=None):
    from kd_det.data.synthetic import generate_dataset
    from kd_det.utils.runs import METRICS, evaluate_members, schedule_opts, train_and_evaluate

    args = parse_args(argv)
    args.output = os.path.abspath(args.output)  # run stamps record absolute paths
    if args.list:
        for k, (label, cfg, opts, t) in METHODS.items():
            print(f"{k:16s} {label}  [{os.path.relpath(cfg, REPO)} {' '.join(opts)}]")
        return
    preset = dict(QUICK if args.quick else FULL)
    for k in FULL:
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    methods = args.methods or [m for m in DEFAULT_METHODS if m in METHODS]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {sorted(METHODS)}.")
    t0 = time.time()
    data = os.path.join(args.output, "data")
    if not args.report_only:
        generate_dataset(data, preset["num_train"], preset["num_val"], preset["image_size"], 0)
    data_opts = [
        "DATASETS.SYNTHETIC_ROOT", data,
        "DATASETS.TRAIN", "('synthetic_study_train',)",
        "DATASETS.TEST", "('synthetic_study_val',)",
    ]  # fmt: skip
    base = {k: preset[k] for k in ("num_train", "num_val", "image_size", "batch")}

    results = {"preset": preset, "seeds": args.seeds, "methods": {}, "jobs": args.jobs}
    env = None
    if args.jobs > 1:
        # Small CPU models scale poorly over intra-op threads: N single-threaded runs side by side
        # train faster than one run using every core (measured; see the README's study section).
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    teacher = {"weights": args.teacher_weights}
    if not any(METHODS[m][3] for m in methods):
        results["teacher"] = None  # no method needs one (e.g. online peers only)
        teacher_job = None
    elif args.teacher_weights:
        # A teacher trained elsewhere (e.g. by tools/demo.py): report its AP if it was evaluated.
        res = os.path.join(os.path.dirname(args.teacher_weights), "final_results.json")
        results["teacher"] = None
        if os.path.exists(res):
            with open(res) as f:
                results["teacher"] = {"bbox": json.load(f)["bbox"], "seconds": None, "reused": True}
        teacher_job = None
    else:
        t_dir = os.path.join(args.output, "runs", "teacher")
        teacher["weights"] = os.path.join(t_dir, "model_final.pth")
        t_params = dict(base, iters=preset["teacher_iters"], seed=42)
        sched = schedule_opts(preset["teacher_iters"], preset["batch"], preset["image_size"])
        t_opts = data_opts + sched + ["SEED", "42"]
        teacher_job = (t_opts, t_dir, t_params)

    # Runs without a teacher first (with --jobs > 1 they overlap the teacher's training), then the
    # distillation runs; each group seed by seed, so an interrupted study has whole seeds to report.
    tasks = [(m, seed) for seed in args.seeds for m in methods]
    tasks.sort(key=lambda t: (METHODS[t[0]][3], args.seeds.index(t[1])))
    lock = threading.Lock()
    progress = {"done": 0, "total": len(tasks) + (teacher_job is not None)}
    teacher_done = threading.Event()

    def report(name, run):
        with lock:
            progress["done"] += 1
            progress["trained"] = progress.get("trained", 0) + (not run["reused"])
            done, total, trained = progress["done"], progress["total"], progress["trained"]
        elapsed = time.time() - t0
        # The pace of runs trained in this invocation (reused ones take no time).
        eta = f"{elapsed / trained * (total - done) / 60:.0f} min" if trained else "n/a"
        print(f"[study] {done}/{total} done: {name} (elapsed {elapsed / 60:.0f} min, "
              f"ETA {eta})", flush=True)  # fmt: skip

    def run_teacher():
        try:
            t_opts, t_dir, t_params = teacher_job
            r = train_and_evaluate("teacher", TEACHER, t_opts, t_dir, t_params, args.force,
                                   quiet=True, env=env, finished_only=args.report_only)  # fmt: skip
            results["teacher"] = r
            if r is not None:
                report("teacher", r)
        finally:
            teacher_done.set()

    def run_task(m, seed):
        label, config, extra, needs_teacher = METHODS[m]
        if needs_teacher:
            teacher_done.wait()
            if not os.path.exists(teacher["weights"]):
                if args.report_only:
                    return None
                raise RuntimeError(f"{m}/seed{seed}: the teacher {teacher['weights']} is missing.")
        opts = data_opts + schedule_opts(preset["iters"], preset["batch"], preset["image_size"])
        opts += ["SEED", str(seed)] + extra + list(args.opts)
        if needs_teacher:
            opts += ["MODEL.KD.TEACHER.WEIGHTS", teacher["weights"]]
        params = dict(base, iters=preset["iters"], seed=seed, method=m,
                      opts=extra + list(args.opts),
                      teacher=_file_id(teacher["weights"]) if needs_teacher else None)  # fmt: skip
        out = os.path.join(args.output, "runs", m, f"seed{seed}")
        run = train_and_evaluate(f"{m}/seed{seed}", config, opts, out, params, args.force,
                                 quiet=True, env=env, finished_only=args.report_only)  # fmt: skip
        if run is None:
            return None
        if m.startswith("online"):
            # Every peer and EMA teacher of the run, labelled (the run's own AP is peer0's).
            run["members"] = evaluate_members(config, opts, out, env=env)
        report(f"{m} seed {seed}", run)
        return run

    if teacher_job is None:
        teacher_done.set()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_teacher)] if teacher_job is not None else []
        runs = {t: pool.submit(run_task, *t) for t in tasks}
        for f in futures:
            f.result()
        for m in methods:
            done = [runs[(m, seed)].result() for seed in args.seeds]
            done = [r for r in done if r is not None]  # --report-only: unfinished runs left out
            if done:
                results["methods"][m] = {"label": METHODS[m][0], "runs": done}
    results["expected_runs"] = len(tasks)
    results["finished_runs"] = sum(len(e["runs"]) for e in results["methods"].values())
    results["wall_minutes"] = None if args.report_only else (time.time() - t0) / 60
    # Training + evaluation time of every run, reused ones included: what a fresh study costs.
    seconds = [r["seconds"] for e in results["methods"].values() for r in e["runs"]]
    if results.get("teacher") and results["teacher"].get("seconds"):
        seconds.append(results["teacher"]["seconds"])
    results["run_minutes"] = sum(x or 0 for x in seconds) / 60
    write_reports(results, args.output, METRICS)
    plot_curves(args.output, results)
    print(open(os.path.join(args.output, "results.md")).read())


def write_reports(results, output, metrics):
    """results.json, results.md (mean +- std, gap closed) and results.png (AP bars)."""
    from kd_det.utils.runs import fmt

    os.makedirs(output, exist_ok=True)
    t = results.get("teacher")
    t_ap = t["bbox"]["AP"] if t else None
    s_ap = None
    if "student" in results["methods"]:
        s_ap = summarize([r["bbox"]["AP"] for r in results["methods"]["student"]["runs"]])[0]
    lines = ["| method | " + " | ".join(metrics) + " | gap closed | runs |",
             "|---|" + "---|" * (len(metrics) + 2)]  # fmt: skip
    if t:
        cells = [fmt(t["bbox"].get(k)) for k in metrics]
        lines.append("| teacher (Lite2-FPN) | " + " | ".join(cells) + " | | 1 |")
    bars = []
    for m, entry in results["methods"].items():
        cells = []
        for k in metrics:
            mean, std = summarize([r["bbox"].get(k) for r in entry["runs"]])
            cells.append("n/a" if mean is None else f"{mean:.1f} +- {std:.1f}")
        ap, ap_std = summarize([r["bbox"]["AP"] for r in entry["runs"]])
        gap = ""
        if t_ap is not None and s_ap is not None and t_ap > s_ap and m != "student":
            gap = f"{(ap - s_ap) / (t_ap - s_ap):+.0%}"
        entry["AP_mean"], entry["AP_std"] = ap, ap_std
        bars.append((entry["label"], ap, ap_std))
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + f" | {gap} | "
                     f"{len(entry['runs'])} |")  # fmt: skip
    member_rows = []
    for m, entry in results["methods"].items():
        names = sorted({k for r in entry["runs"] for k in r.get("members", {})})
        for name in names:
            mean, std = summarize([r["members"][name]["bbox"]["AP"] for r in entry["runs"]
                                   if name in r.get("members", {})])  # fmt: skip
            member_rows.append(f"| {entry['label']} | {name} | {fmt(mean)} +- {fmt(std)} |")
    if member_rows:
        lines += ["", "Online distillation, every member (AP, mean +- std over seeds):", "",
                  "| method | member | AP |", "|---|---|---|"] + member_rows  # fmt: skip
    p = results["preset"]
    lines.append("")
    lines.append(
        f"Generated data: {p['num_train']} train / {p['num_val']} val images of "
        f"{p['image_size']} px; students {p['iters']} iterations, teacher "
        f"{p['teacher_iters']}, batch {p['batch']}; seeds {results['seeds']}; the runs it "
        f"reports took {results.get('run_minutes', 0):.0f} min to train and evaluate"
        + (f" ({results.get('jobs', 1)} at a time)" if results.get("jobs", 1) > 1 else "")
        + (
            f"; this invocation took {results['wall_minutes']:.0f} min."
            if results.get("wall_minutes") is not None
            else "."
        )
    )
    if results.get("finished_runs", 0) < results.get("expected_runs", 0):
        lines.append(
            f"Partial: {results['finished_runs']} of {results['expected_runs']} runs had finished "
            "when this table was written (`--report-only`)."
        )
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    names = [b[0] for b in bars][::-1]
    ax.barh(names, [b[1] or 0 for b in bars][::-1], xerr=[b[2] or 0 for b in bars][::-1],
            color="#4c72b0")  # fmt: skip
    if t_ap is not None:
        ax.axvline(t_ap, color="#c44e52", linestyle="--", label=f"teacher {t_ap:.1f}")
        ax.legend(loc="lower right")
    ax.set_xlabel("COCO box AP (mean +- std over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(output, "results.png"), dpi=100)


DETECTION_LOSSES = ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc")


def _detection_curve(metrics_json, prefix="loss_"):
    """(iterations, summed detection losses) from a run's metrics.json; KD terms excluded so that
    every method is on the same scale (for online runs, peer0's own losses)."""
    by_iter = {}
    if not os.path.exists(metrics_json):
        return [], []
    keys = [prefix + k[len("loss_") :] for k in DETECTION_LOSSES]
    with open(metrics_json) as f:
        for line in f:
            d = json.loads(line)
            if "iteration" in d and all(k in d for k in keys):
                # A resumed run logs the iterations after its last checkpoint again: keep the last.
                by_iter[d["iteration"]] = sum(d[k] for k in keys)
    its = sorted(by_iter)
    return its, [by_iter[i] for i in its]


def plot_curves(output, results):
    """``curves.png``: detection-loss learning curves of the teacher, the student alone (each seed)
    and, when present, the SSIM-distilled student and online peer0, to show that runs learned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = os.path.join(output, "runs")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    its, vals = _detection_curve(os.path.join(runs, "teacher", "metrics.json"))
    if its:
        ax.plot(its, vals, color="#c44e52", label="teacher (Lite2-FPN)")
    styles = {"student": ("#4c72b0", "loss_"), "ssim": ("#55a868", "loss_"),
              "online": ("#8172b2", "loss_peer0_")}  # fmt: skip
    for m, (color, prefix) in styles.items():
        if m not in results["methods"]:
            continue
        for k, seed in enumerate(results["seeds"]):
            its, vals = _detection_curve(
                os.path.join(runs, m, f"seed{seed}", "metrics.json"), prefix
            )
            label = results["methods"][m]["label"] if k == 0 else None
            if its:
                ax.plot(its, vals, color=color, alpha=0.8, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("detection losses (cls + box + rpn), 20-it median")
    ax.set_title("Learning curves (one line per seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(output, "curves.png"), dpi=100)


if __name__ == "__main__":
    main()
