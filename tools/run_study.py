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
import time

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
QUICK = dict(num_train=500, num_val=100, image_size=160, teacher_iters=400, iters=250, batch=8)
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
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of {sorted(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--teacher-weights", default="", help="reuse a trained teacher checkpoint")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    for k in FULL:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    return p.parse_args(argv)


def summarize(values):
    vals = [v for v in values if v is not None and v == v and v >= 0]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def main(argv=None):
    from kd_det.data.synthetic import generate_dataset
    from kd_det.utils.runs import METRICS, evaluate_members, schedule_opts, train_and_evaluate

    args = parse_args(argv)
    if args.list:
        for k, (label, cfg, opts, t) in METHODS.items():
            print(f"{k:16s} {label}  [{os.path.relpath(cfg, REPO)} {' '.join(opts)}]")
        return
    preset = dict(QUICK if args.quick else FULL)
    for k in FULL:
        if getattr(args, k) is not None:
            preset[k] = getattr(args, k)
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"Unknown methods {unknown}; choose from {sorted(METHODS)}.")
    t0 = time.time()
    data = os.path.join(args.output, "data")
    generate_dataset(data, preset["num_train"], preset["num_val"], preset["image_size"], 0)
    data_opts = [
        "DATASETS.SYNTHETIC_ROOT", data,
        "DATASETS.TRAIN", "('synthetic_study_train',)",
        "DATASETS.TEST", "('synthetic_study_val',)",
    ]  # fmt: skip
    base = {k: preset[k] for k in ("num_train", "num_val", "image_size", "batch")}

    teacher_weights = args.teacher_weights
    results = {"preset": preset, "seeds": args.seeds, "methods": {}}
    if not any(METHODS[m][3] for m in methods):
        results["teacher"] = None  # no method needs one (e.g. online peers only)
    elif args.teacher_weights:
        # A teacher trained elsewhere (e.g. by tools/demo.py): report its AP if it was evaluated.
        res = os.path.join(os.path.dirname(args.teacher_weights), "final_results.json")
        results["teacher"] = None
        if os.path.exists(res):
            with open(res) as f:
                results["teacher"] = {"bbox": json.load(f)["bbox"], "seconds": None, "reused": True}
    else:
        t_dir = os.path.join(args.output, "runs", "teacher")
        t_params = dict(base, iters=preset["teacher_iters"], seed=42)
        sched = schedule_opts(preset["teacher_iters"], preset["batch"], preset["image_size"])
        opts = data_opts + sched + ["SEED", "42"]
        r = train_and_evaluate("teacher", TEACHER, opts, t_dir, t_params, args.force, quiet=True)
        results["teacher"] = r
        teacher_weights = os.path.join(t_dir, "model_final.pth")

    total = len(methods) * len(args.seeds)
    done = 0
    for m in methods:
        label, config, extra, needs_teacher = METHODS[m]
        runs = []
        for seed in args.seeds:
            opts = data_opts + schedule_opts(preset["iters"], preset["batch"], preset["image_size"])
            opts += ["SEED", str(seed)] + extra
            if needs_teacher:
                opts += ["MODEL.KD.TEACHER.WEIGHTS", teacher_weights]
            params = dict(base, iters=preset["iters"], seed=seed, method=m, opts=extra,
                          teacher=teacher_weights if needs_teacher else None)  # fmt: skip
            out = os.path.join(args.output, "runs", m, f"seed{seed}")
            elapsed = time.time() - t0
            eta = elapsed / done * (total - done) if done else float("nan")
            print(f"[study] {done + 1}/{total} {m} seed {seed} (elapsed {elapsed / 60:.0f} min, "
                  f"ETA {eta / 60:.0f} min)", flush=True)  # fmt: skip
            run = train_and_evaluate(f"{m}/seed{seed}", config, opts, out, params, args.force,
                                     quiet=True)  # fmt: skip
            if m.startswith("online"):
                # Every peer and EMA teacher of the run, labelled (the run's own AP is peer0's).
                run["members"] = evaluate_members(config, opts, out)
            runs.append(run)
            done += 1
        results["methods"][m] = {"label": label, "runs": runs}
    results["wall_minutes"] = (time.time() - t0) / 60
    write_reports(results, args.output, METRICS)
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
        f"{p['teacher_iters']}, batch {p['batch']}; seeds {results['seeds']}; wall time "
        f"{results['wall_minutes']:.0f} min."
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


if __name__ == "__main__":
    main()
