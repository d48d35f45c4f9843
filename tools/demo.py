#!/usr/bin/env python
"""kd_det's end-to-end demo (``make demo``): data -> teacher -> student -> distilled students.

1. Generate COCO-format scenes (``tools/make_synthetic_coco.py``'s generator), once.
2. Train the teacher (EfficientNet-Lite2 + FPN) and, beside it, the student (EfficientNet-Lite0 +
   FPN) alone; a teacher a previous demo trained with the same settings is reused.
3. Train the same student, same schedule and seed, with the distillation that did best in the
   method study (by dev AP, ``configs/Synthetic/tuned/ranking.json``) and, beside it, with SSIM
   hints, each at the study's tuned setting (``configs/Synthetic/tuned/<method>.yaml``, written
   by ``method_study.export_tuned_configs``). Without them, the shipped SSIM config.
4. Evaluate every model with COCO AP (pycocotools) and print a table; write ``results.json`` and
   ``results.md`` under ``--output``, and ``compare.png`` (``tools/compare_predictions.py``: four
   validation images with the ground truth, the teacher, the student alone and the best
   distilled student). Each run keeps detectron2's ``metrics.json``, TensorBoard events and log in
   its own directory.

Every stage is a ``tools/train_net.py`` run, so what the demo does is what a user would type. A
finished stage is skipped on the next ``make demo`` (``--force`` retrains everything).

Every run uses one compute thread and loads data in its own process, and runs train two at a
time: on a 2-core machine that is faster than one run on both cores, and a fixed thread count
(with the kernel caps of ``kd_det/utils/runs.py``) gives the same numbers on every machine of the
kind, whatever its core count (``dev/check_reproducibility.py``).
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(REPO, "configs", "Synthetic")
SHIPPED_SSIM = os.path.join(CFG, "distill_lite2_to_lite0_ssim.yaml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(REPO, "output", "demo"))
    p.add_argument("--num-train", type=int, default=500)
    p.add_argument("--num-val", type=int, default=100)
    # The study's image size: the tuned settings (configs/Synthetic/tuned/) were chosen at 128 px,
    # and at 160 px the demo did not fit its 20 minutes on 2 cores.
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--teacher-iters", type=int, default=400)
    p.add_argument("--student-iters", type=int, default=250)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=42, help="training seed (same for every run)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain every stage")
    p.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                   help="runs trained side by side (1: one after the other, for a machine whose "
                        "other core is busy; the numbers are the same)")  # fmt: skip
    p.add_argument(
        "--tuned",
        default=os.path.join(CFG, "tuned"),
        help="the method study's tuned configs and its ranking.json",
    )
    p.add_argument("--teacher-min-ap", type=float, default=None,
                   help="MODEL.KD.TEACHER.MIN_AP of the distillation run (0 only logs the "
                        "teacher check's AP; default: the config's)")  # fmt: skip
    p.add_argument("--list", action="store_true",
                   help="print the students the demo trains (from --tuned) and exit")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for name, (label, config, needs_teacher) in demo_methods(args.tuned).items():
            teacher = "teacher" if needs_teacher else "-"
            print(f"{name:12s} {teacher:8s} {os.path.relpath(config, REPO)}  {label}")
        return
    t0 = time.time()
    os.makedirs(args.output, exist_ok=True)
    from kd_det.data.synthetic import generate_dataset
    from kd_det.utils.runs import (
        markdown_table,
        schedule_opts,
        schedule_relative_opts,
        train_and_evaluate,
    )

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def run_stage(name, out_dir, config, opts, params, quiet=False):
        try:
            r = train_and_evaluate(
                name, config, opts, out_dir, params, args.force, quiet, env, repo=REPO
            )
        except RuntimeError as e:
            raise SystemExit(f"[demo] {e}")
        return r["bbox"], r["seconds"]

    data = os.path.join(args.output, "data")
    print(f"[demo] 1/4 data: {args.num_train} train + {args.num_val} val scenes of "
          f"{args.image_size} px in {data}", flush=True)  # fmt: skip
    generate_dataset(data, args.num_train, args.num_val, args.image_size, args.data_seed)
    data_opts = [
        "DATASETS.SYNTHETIC_ROOT", data,
        "DATASETS.TRAIN", "('synthetic_demo_train',)",
        "DATASETS.TEST", "('synthetic_demo_val',)",
        "SEED", str(args.seed),
        "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    base = {k: getattr(args, k) for k in ("num_train", "num_val", "image_size", "batch", "seed")}
    base["data_seed"] = args.data_seed
    base["threads"] = 1  # part of what defines a run's numbers (so is the loader: v2 is kd_det's)
    base["loader"] = "kd_det-resumable"

    teacher_dir = os.path.join(args.output, "teacher_lite2")
    t_opts = data_opts + schedule_opts(args.teacher_iters, args.batch, args.image_size)
    s_opts = data_opts + schedule_opts(args.student_iters, args.batch, args.image_size)
    methods = demo_methods(args.tuned)
    student_cfg = methods.pop("student")
    print(f"[demo] 2/4 teacher (EfficientNet-Lite2 + FPN; log in {teacher_dir}/log.txt) and "
          "3/4 student alone (EfficientNet-Lite0 + FPN), side by side", flush=True)  # fmt: skip
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        teacher = pool.submit(
            run_stage, "teacher", teacher_dir, os.path.join(CFG, "faster_rcnn_lite2_FPN.yaml"),
            t_opts, dict(base, iters=args.teacher_iters), quiet=True,
        )  # fmt: skip
        student = pool.submit(
            run_stage, "student", os.path.join(args.output, "student_lite0"), student_cfg[1],
            s_opts, dict(base, iters=args.student_iters),
        )  # fmt: skip
        (t_res, t_sec), (s_res, s_sec) = teacher.result(), student.result()

    print(f"[demo] 4/4 distilled students: {', '.join(l for l, _, _ in methods.values())}, "
          "side by side", flush=True)  # fmt: skip
    kd_opts = s_opts + ["MODEL.KD.TEACHER.WEIGHTS", os.path.join(teacher_dir, "model_final.pth")]
    if args.teacher_min_ap is not None:
        kd_opts += ["MODEL.KD.TEACHER.MIN_AP", str(args.teacher_min_ap)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            name: pool.submit(
                run_stage, label, os.path.join(args.output, f"student_lite0_{name}"), config,
                # e.g. a tuned EMA teacher start "half-way" moves to the demo's schedule
                (kd_opts if needs_teacher else s_opts)
                + schedule_relative_opts(config, args.student_iters),
                dict(base, iters=args.student_iters,
                     teacher=dict(base, iters=args.teacher_iters) if needs_teacher else None),
            )  # fmt: skip
            for name, (label, config, needs_teacher) in methods.items()
        }
        distilled = {name: f.result() for name, f in futures.items()}

    rows = [
        (f"teacher: Lite2-FPN, {args.teacher_iters} it", t_res, t_sec),
        (f"{student_cfg[0]}, {args.student_iters} it", s_res, s_sec),
    ] + [(f"{methods[n][0]}, {args.student_iters} it", r, sec) for n, (r, sec) in distilled.items()]
    md = markdown_table(
        [(label, res, {"train time": f"{sec / 60:.1f} min"}) for label, res, sec in rows],
        extra_cols=("train time",),
    )
    gap = t_res["AP"] - s_res["AP"]
    lines = []
    for name, (res, _) in distilled.items():
        delta = res["AP"] - s_res["AP"]
        closed = delta / gap if gap > 0 else float("nan")
        lines.append(f"{methods[name][0]} changed the student's AP by {delta:+.1f} "
                     f"({closed:.0%} of the teacher-student gap of {gap:.1f} AP).")  # fmt: skip
    summary = "\n".join(lines)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(md + "\n\n" + summary + "\n")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(
            {"args": vars(args), "teacher": t_res, "student": s_res,
             "distilled": {n: r for n, (r, _) in distilled.items()},
             "configs": {n: os.path.relpath(c, REPO) for n, (_, c, _) in methods.items()},
             "seconds": {"teacher": t_sec, "student": s_sec,
                         **{n: sec for n, (_, sec) in distilled.items()}}},
            f, indent=2,
        )  # fmt: skip
    print("\n" + md + "\n\n" + summary)
    best = next(iter(methods))
    draw_comparison(args, data_opts, teacher_dir, student_cfg[1], methods[best][1],
                    f"student_lite0_{best}")  # fmt: skip
    print(
        f"\n[demo] done in {(time.time() - t0) / 60:.1f} min; results in {args.output}/results.md"
    )


def demo_methods(tuned):
    """``{name: (label, config, needs a teacher)}``: the student alone first, then the study's
    best method by dev AP, then SSIM (if not the best), from the tuned configs in ``tuned``;
    without them (the study has not finished), the shipped student and SSIM configs.

    The study's output is data here: ``ranking.json`` (methods by mean dev AP, with their labels)
    and one config per method. A config whose meta-architecture is ``DistillationRCNN`` needs the
    teacher the demo trains."""
    ranking = os.path.join(tuned, "ranking.json")
    if not os.path.exists(ranking):
        return {
            "student": ("student alone: Lite0-FPN", os.path.join(CFG, "faster_rcnn_lite0_FPN.yaml"),
                        False),
            "ssim": ("student + SSIM KD (shipped setting)", SHIPPED_SSIM, True),
        }  # fmt: skip
    with open(ranking) as f:
        ranked = json.load(f)
    labels = {r["method"]: r["label"] for r in ranked}
    best = ranked[0]["method"]
    out = {"student": ("student alone (study size)", os.path.join(tuned, "student.yaml"), False)}
    for name in dict.fromkeys([best, "ssim"]):
        label = labels.get(name, name) + (" [best in the study]" if name == best else "")
        out[name] = (label, os.path.join(tuned, f"{name}.yaml"), None)
    for name, (label, config, _) in out.items():
        if not os.path.exists(config):
            raise SystemExit(f"{config} is missing: the study's tuned configs are incomplete.")
        out[name] = (label, config, needs_teacher(config))
    return out


def needs_teacher(config):
    """Whether ``config`` distills from a trained teacher (a ``DistillationRCNN``)."""
    from kd_det.config import get_kd_cfg

    cfg = get_kd_cfg()
    cfg.merge_from_file(config)
    return cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN"


def draw_comparison(args, data_opts, teacher_dir, student_cfg, distilled_cfg, distilled_dir):
    """``compare.png``: 4 validation images, ground truth, the teacher's, the student alone's and
    the best distilled student's detections."""
    import subprocess

    out = args.output
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare_predictions.py"),
           "--teacher-config", os.path.join(CFG, "faster_rcnn_lite2_FPN.yaml"),
           "--teacher-weights", os.path.join(teacher_dir, "model_final.pth"),
           "--student-config", student_cfg,
           "--student-weights", os.path.join(out, "student_lite0", "model_final.pth"),
           "--distilled-config", distilled_cfg,
           "--distilled-weights", os.path.join(out, distilled_dir, "model_final.pth"),
           "--num-images", "4", "--score-threshold", "0.5",
           "--output", os.path.join(out, "compare.png"),
           *data_opts, "INPUT.MIN_SIZE_TEST", str(args.image_size)]  # fmt: skip
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit("[demo] tools/compare_predictions.py failed")


if __name__ == "__main__":
    main()
