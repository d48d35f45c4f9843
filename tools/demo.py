#!/usr/bin/env python
"""kd_det's end-to-end demo (``make demo``): data -> teacher -> student -> distilled student.

1. Generate COCO-format scenes (``tools/make_synthetic_coco.py``'s generator), once.
2. Train the teacher (EfficientNet-Lite2 + FPN), or reuse it when a previous demo trained it with
   the same settings.
3. Train the student (EfficientNet-Lite0 + FPN) alone.
4. Train the same student, same schedule and seed, with SSIM distillation from the teacher.
5. Evaluate all three with COCO AP (pycocotools) and print a table; write ``results.json`` and
   ``results.md`` under ``--output``, and ``compare.png`` (``tools/compare_predictions.py``: four
   validation images with the ground truth and each model's detections). Each run keeps
   detectron2's ``metrics.json``, TensorBoard events and log in its own directory.

Every stage is a ``tools/train_net.py`` run, so what the demo does is what a user would type. A
finished stage is skipped on the next ``make demo`` (``--force`` retrains everything).

Every run uses one compute thread and loads data in its own process, and the teacher and the
student alone train side by side: on a 2-core machine that is faster than one run on both cores,
and a fixed thread count (with the kernel caps of ``tools/runs.py``) gives the same numbers on
every machine of the kind, whatever its core count (``tools/check_reproducibility.py``).
"""

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.path.join(REPO, "configs", "Synthetic")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(REPO, "output", "demo"))
    p.add_argument("--num-train", type=int, default=500)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--teacher-iters", type=int, default=400)
    p.add_argument("--student-iters", type=int, default=250)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=42, help="training seed (same for every run)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain every stage")
    p.add_argument("--teacher-min-ap", type=float, default=None,
                   help="MODEL.KD.TEACHER.MIN_AP of the distillation run (0 only logs the "
                        "teacher check's AP; default: the config's)")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    os.makedirs(args.output, exist_ok=True)
    sys.path.insert(0, REPO)
    from kd_det.data.synthetic import generate_dataset
    from runs import markdown_table, schedule_opts, train_and_evaluate

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def run_stage(name, out_dir, config, opts, params, quiet=False):
        try:
            r = train_and_evaluate(
                name, config, opts, out_dir, params, force=args.force, quiet=quiet, env=env
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
    print(f"[demo] 2/4 teacher (EfficientNet-Lite2 + FPN; log in {teacher_dir}/log.txt) and "
          "3/4 student alone (EfficientNet-Lite0 + FPN), side by side", flush=True)  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        teacher = pool.submit(
            run_stage, "teacher", teacher_dir, os.path.join(CFG, "faster_rcnn_lite2_FPN.yaml"),
            t_opts, dict(base, iters=args.teacher_iters), quiet=True,
        )  # fmt: skip
        student = pool.submit(
            run_stage, "student", os.path.join(args.output, "student_lite0"),
            os.path.join(CFG, "faster_rcnn_lite0_FPN.yaml"), s_opts,
            dict(base, iters=args.student_iters),
        )  # fmt: skip
        (t_res, t_sec), (s_res, s_sec) = teacher.result(), student.result()

    print("[demo] 4/4 student + SSIM distillation from the teacher", flush=True)
    kd_opts = s_opts + [
        "MODEL.KD.TEACHER.WEIGHTS", os.path.join(teacher_dir, "model_final.pth"),
    ]  # fmt: skip
    if args.teacher_min_ap is not None:
        kd_opts += ["MODEL.KD.TEACHER.MIN_AP", str(args.teacher_min_ap)]
    k_res, k_sec = run_stage(
        "distilled student", os.path.join(args.output, "student_lite0_ssim_kd"),
        os.path.join(CFG, "distill_lite2_to_lite0_ssim.yaml"), kd_opts,
        dict(base, iters=args.student_iters, teacher=dict(base, iters=args.teacher_iters)),
    )  # fmt: skip

    rows = [
        (f"teacher: Lite2-FPN, {args.teacher_iters} it", t_res, t_sec),
        (f"student: Lite0-FPN, {args.student_iters} it", s_res, s_sec),
        (f"student + SSIM KD, {args.student_iters} it", k_res, k_sec),
    ]
    md = markdown_table(
        [(label, res, {"train time": f"{sec / 60:.1f} min"}) for label, res, sec in rows],
        extra_cols=("train time",),
    )
    gap = t_res["AP"] - s_res["AP"]
    closed = (k_res["AP"] - s_res["AP"]) / gap if gap > 0 else float("nan")
    summary = (
        f"Distillation changed the student's AP by {k_res['AP'] - s_res['AP']:+.1f} "
        f"({closed:.0%} of the teacher-student gap of {gap:.1f} AP)."
    )
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(md + "\n\n" + summary + "\n")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(
            {"args": vars(args), "teacher": t_res, "student": s_res, "distilled": k_res,
             "seconds": {"teacher": t_sec, "student": s_sec, "distilled": k_sec},
             "gap_closed": closed},
            f, indent=2,
        )  # fmt: skip
    print("\n" + md + "\n\n" + summary)
    draw_comparison(args, data_opts, teacher_dir)
    print(
        f"\n[demo] done in {(time.time() - t0) / 60:.1f} min; results in {args.output}/results.md"
    )


def draw_comparison(args, data_opts, teacher_dir):
    """``compare.png``: 4 validation images, ground truth and the three models' detections."""
    import subprocess

    out = args.output
    cmd = [sys.executable, os.path.join(REPO, "tools", "compare_predictions.py"),
           "--teacher-config", os.path.join(CFG, "faster_rcnn_lite2_FPN.yaml"),
           "--teacher-weights", os.path.join(teacher_dir, "model_final.pth"),
           "--student-config", os.path.join(CFG, "faster_rcnn_lite0_FPN.yaml"),
           "--student-weights", os.path.join(out, "student_lite0", "model_final.pth"),
           "--distilled-config", os.path.join(CFG, "distill_lite2_to_lite0_ssim.yaml"),
           "--distilled-weights", os.path.join(out, "student_lite0_ssim_kd", "model_final.pth"),
           "--num-images", "4", "--score-threshold", "0.5",
           "--output", os.path.join(out, "compare.png"),
           *data_opts, "INPUT.MIN_SIZE_TEST", str(args.image_size)]  # fmt: skip
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit("[demo] tools/compare_predictions.py failed")


if __name__ == "__main__":
    main()
