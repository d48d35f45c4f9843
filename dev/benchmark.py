#!/usr/bin/env python
"""One benchmark of everything kd_det adds to a training step: the README's performance table.

Two parts, measured in the same run so every ratio has a baseline measured alongside it:

1. Training step (``dev/benchmark_kd.py``): per-iteration time (median over ``--iters``
   iterations after ``--warmup``) and peak memory of every method -- the student alone, the
   teacher's forward, MSE / SSIM / multi-level / dynamic-weight distillation and online
   distillation of two peers -- each in its own process, as ratios to the student alone; then
   ``--jobs`` student runs side by side (the throughput ``method_study.run_study --jobs`` gets).
2. Data (``dev/benchmark_data.py``): images per second of detectron2's ``DatasetMapper`` and of
   ``MixedSampleDatasetMapper`` for every mix type (fresh partners and the partner cache), as
   ratios to the plain mapper.

It records the device (a GPU when there is one, else the CPU, and the thread count), torch and
detectron2 versions, and writes ``<output>/benchmark.json`` and ``<output>/benchmark.md``.

    python dev/benchmark.py                                    # defaults used for the README
    python dev/benchmark.py --iters 3 --warmup 1 --data-images 8 --data-repeats 1   # smoke
"""

import argparse
import json
import os
import platform
import time

import benchmark_data  # a sibling script: Python puts dev/ first on the import path for it
import benchmark_kd
import profile_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(REPO, "output", "benchmark"))
    p.add_argument("--variants", nargs="+", default=list(benchmark_kd.VARIANTS),
                   choices=benchmark_kd.VARIANTS)  # fmt: skip
    p.add_argument("--image-size", type=int, default=192, help="training-step input side")
    p.add_argument("--batch", type=int, default=8, help="training-step images per iteration")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    p.add_argument("--data-images", type=int, default=32, help="images of the mapper benchmark")
    p.add_argument("--data-size", type=int, default=256, help="side of those images")
    p.add_argument("--data-repeats", type=int, default=3, help="timed passes per mapper")
    p.add_argument("--skip-data", action="store_true", help="only the training-step part")
    p.add_argument(
        "--speedup-pairs",
        type=int,
        default=2,
        help="before/after process pairs per method of the speed-up part (0: skip)",
    )
    p.add_argument("--speedup-iters", type=int, default=8,
                   help="timed iterations per process of the speed-up part")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2,
                   help="also time this many student runs side by side (0: skip)")  # fmt: skip
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the step models")
    return p.parse_args(argv)


def environment(device):
    import detectron2
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        name = torch.cuda.get_device_name(0)
    else:
        name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        name += f"{torch.get_num_threads()} torch threads"
    return {"device": dev, "device_name": name, "torch": torch.__version__,
            "detectron2": detectron2.__version__, "python": platform.python_version()}  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    env = environment(args.device)
    start = time.time()
    kd_args = benchmark_kd.parse_args(
        ["--image-size", str(args.image_size), "--batch", str(args.batch), "--iters",
         str(args.iters), "--warmup", str(args.warmup), "--variants", *args.variants]
        + (["--device", args.device] if args.device else [])
        + list(args.opts)
    )  # fmt: skip
    md = [f"Device: {env['device']} ({env['device_name']}); torch {env['torch']}, "
          f"detectron2 {env['detectron2']}.", ""]  # fmt: skip
    speedup = None
    if args.speedup_pairs > 0:
        # A real training step (KDTrainer's model, loader and optimizer on generated data) with
        # kd_det's settings before and after the speed-ups, alternating processes.
        p_args = profile_step.parse_args(
            ["--iters", str(args.speedup_iters), "--warmup", "2", "--image-size",
             str(args.image_size), "--batch", str(args.batch), "--data",
             os.path.join(args.output, "profile_data")]
        )  # fmt: skip
        speedup = profile_step.compare(p_args, ["student", "ssim", "multilevel"],
                                       pairs=args.speedup_pairs)  # fmt: skip
        md += ["### Speed-ups (before / after, same run)", "",
               "Before: " + " ".join(profile_step.SETTINGS["before"]) + "; after: "
               + " ".join(profile_step.SETTINGS["after"]) + f"; {args.batch} images of "
               f"{args.image_size} px per step, with data loading; medians of "
               f"{args.speedup_pairs} alternating process pairs.", "",
               profile_step.compare_markdown(speedup), ""]  # fmt: skip
    step = benchmark_kd.measure(kd_args)
    md += ["### Training step", "", benchmark_kd.markdown(step, kd_args)]
    side = None
    if args.jobs > 1 and "student" in step:
        runs = benchmark_kd.measure_side_by_side(kd_args, jobs=args.jobs)
        alone = step["student"]["median_s"]
        medians = [r["median_s"] for r in runs]
        gain = sum(1.0 / m for m in medians) / (1.0 / alone)
        side = {"jobs": args.jobs, "median_s": medians, "throughput_vs_alone": gain}
        md += ["", f"{args.jobs} student runs side by side, "
               f"{max(1, (os.cpu_count() or 1) // args.jobs)} thread(s) each: "
               + ", ".join(f"{m:.3f}" for m in medians)
               + f" s / iter, i.e. x{gain:.2f} the iterations per second of one run alone "
               "(`method_study.run_study --jobs`)."]  # fmt: skip
    data = None
    if not args.skip_data:
        d_args = benchmark_data.parse_args(
            ["--num-images", str(args.data_images), "--image-size", str(args.data_size),
             "--repeats", str(args.data_repeats)]
        )  # fmt: skip
        rows, desc = benchmark_data.measure(d_args)
        data = {"description": desc, "images_per_s": dict(rows)}
        md += ["", "### Data mapper (one worker process)", "", desc + ".", "",
               benchmark_data.markdown(rows)]  # fmt: skip
    minutes = (time.time() - start) / 60
    md += ["", f"Benchmark wall time {minutes:.1f} min."]
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.output, "benchmark.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args), "speedup": speedup,
                   "training_step": step,
                   "side_by_side": side, "data": data, "wall_minutes": minutes},
                  f, indent=2)  # fmt: skip
    with open(os.path.join(args.output, "benchmark.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
