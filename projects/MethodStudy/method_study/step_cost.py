"""What a study will cost before it runs: seconds per training step of each kind of run, and the
hours its plan adds up to.

A plan (:mod:`method_study.plan`, :mod:`method_study.plan_retinanet`) names a teacher, a student,
dev trials and final runs. Every kind of run is built from its config with random weights (cost
does not depend on the weights; the teacher through ``MODEL.KD.TEACHER.ALLOW_RANDOM``) and timed
for ``--steps`` SGD steps after one untimed step, on a random batch at the preset's input size and
batch, with the threads this process has (``OMP_NUM_THREADS=1`` for the study's one thread per
run). A family is timed once, at its first trial: its trials change weights and options of the
same terms. Options that name another family's pick (``@pick:...``) are left out of the timing.
Evaluations are not counted (about a tenth more in the study).

    OMP_NUM_THREADS=1 python -m method_study.step_cost --plan retinanet
    OMP_NUM_THREADS=1 python -m method_study.step_cost --plan ssim_window   # issue 29's 256 px
    OMP_NUM_THREADS=1 python -m method_study.step_cost --plan study --steps 5
"""

import argparse
import importlib
import json
import os
import statistics
import time
from collections import Counter

#: ``--plan`` name -> (plan module, the driver module whose ``PRESETS`` it runs at).
PLANS = {"study": ("plan", "run_study"), "retinanet": ("plan_retinanet", "run_retinanet"),
         "ssim_window": ("plan", "ssim_window")}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", choices=sorted(PLANS), default="retinanet")
    p.add_argument("--preset", default="full", help="the driver's preset (full, quick)")
    p.add_argument("--image-size", type=int, default=None, help="instead of the preset's")
    p.add_argument("--batch", type=int, default=None, help="instead of the preset's")
    p.add_argument("--steps", type=int, default=3, help="timed steps per kind (the median)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of every final run")
    p.add_argument("--output", default=None, help="also write the table's rows as JSON here")
    return p.parse_args(argv)


def rows(study_plan, preset, seeds):
    """``[{part, config, opts, teacher, runs, iters}]``: every run the plan trains, grouped by
    what it costs per step (the teacher, each family's sweep, each final's seeds); ``opts`` are
    what is timed: the student's size and the options, without other families' picks."""
    trials = study_plan.dev_trials(preset["iters"])
    first, count = {}, Counter(t.family for t in trials)
    for t in trials:
        first.setdefault(t.family, t)
    out = [dict(part="teacher", config=study_plan.TEACHER, opts=(), teacher=False, runs=1,
                iters=preset["teacher_iters"])]  # fmt: skip
    for fam, t in first.items():
        out.append(dict(part=f"dev sweep: {fam}", config=t.config, opts=t.opts,
                        teacher=t.teacher, runs=count[fam], iters=preset["iters"]))  # fmt: skip
    for f in study_plan.finals():
        fam = f.reuses.split("/")[0]
        t = first.get(fam)
        out.append(dict(part=f"final: {f.name}" + (" (seed 0 is a dev trial)" if f.reuses else ""),
                        config=t.config if t else f.config, opts=t.opts if t else f.opts,
                        teacher=f.teacher, runs=seeds - bool(f.reuses),
                        iters=preset["iters"]))  # fmt: skip
    for r in out[1:]:
        picked = [o for o in r["opts"] if not o.startswith("@pick:")]
        r["opts"] = list(study_plan.student_opts(r["config"])) + picked
    return out


def window_rows(preset, seeds, diagnosis=None):
    """:func:`rows` of :mod:`method_study.ssim_window`: its teacher, then each method's seeds
    (the diagnosis's best SSIM variant included when ``diagnosis``, its results.json, has one)."""
    from . import RESULTS, plan, ssim_window

    diagnosis = diagnosis or os.path.join(RESULTS, "ssim_diagnosis", "results.json")
    out = [dict(part="teacher", config=plan.TEACHER, opts=[], teacher=False, runs=1,
                iters=preset["teacher_iters"])]  # fmt: skip
    for m in ssim_window.methods(*ssim_window.best_variant(diagnosis)):
        out.append(dict(part=m.name, config=m.config, opts=list(m.opts), teacher=m.teacher,
                        runs=seeds, iters=preset["iters"]))  # fmt: skip
    return out


def step_seconds(config, opts, image_size, batch, steps):
    """Median seconds of one SGD step (forward, backward, optimizer) of ``config`` + ``opts``."""
    import torch
    from detectron2.utils.events import EventStorage

    import kd_det  # noqa: F401  (registers kd_det's models)
    from kd_det.config import get_kd_cfg
    from kd_det.engine import KDTrainer
    from kd_det.utils.testing import random_batch

    cfg = get_kd_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", str(batch),
                                      "INPUT.MIN_SIZE_TRAIN", f"({image_size},)"])  # fmt: skip
    if cfg.MODEL.META_ARCHITECTURE.startswith("Distillation"):
        cfg.merge_from_list(["MODEL.KD.TEACHER.WEIGHTS", "", "MODEL.KD.TEACHER.ALLOW_RANDOM",
                             "True", "MODEL.KD.WARMUP_ITERS", "0"])  # fmt: skip
    torch.manual_seed(0)
    model = KDTrainer.build_model(cfg)
    optimizer = KDTrainer.build_optimizer(cfg, model)
    classes = (cfg.MODEL.RETINANET.NUM_CLASSES if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
               else cfg.MODEL.ROI_HEADS.NUM_CLASSES)  # fmt: skip
    data = random_batch(n=batch, size=image_size, num_classes=classes)
    model.train()
    times = []
    with EventStorage(0) as storage:
        for _ in range(steps + 1):
            start = time.perf_counter()
            losses = model(data)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            storage.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def estimate(table, preset, steps=3, timer=step_seconds):
    """``table`` (:func:`rows`, :func:`window_rows`) with ``seconds`` per step, each kind timed
    once, and ``hours`` (seconds x runs x iterations)."""
    cache, out = {}, []
    for r in table:
        key = (r["config"], tuple(r["opts"]))
        if key not in cache:
            cache[key] = timer(r["config"], list(r["opts"]), preset["image_size"],
                               preset["batch"], steps)  # fmt: skip
        out.append(dict(r, seconds=cache[key],
                        hours=cache[key] * r["runs"] * r["iters"] / 3600))  # fmt: skip
    return out


def torch_threads():
    import torch

    return torch.get_num_threads()


def markdown(table, preset, parallel=True):
    """The table; ``parallel``: the driver runs two runs side by side with ``--jobs 2``
    (ssim_window runs one at a time)."""
    lines = [f"Training steps at {preset['image_size']} px, batch {preset['batch']} (random "
             "weights; evaluations not counted):", "",
             "| part | runs | iterations | s / step | hours on one thread |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in table:
        lines.append(f"| {r['part']} | {r['runs']} | {r['iters']} | {r['seconds']:.2f} | "
                     f"{r['hours']:.1f} |")  # fmt: skip
    total = sum(r["hours"] for r in table)
    runs = sum(r["runs"] for r in table)
    wall = (f"about {total / 2:.0f} wall-clock hours with `--jobs 2` on two free cores" if parallel
            else "one run at a time")  # fmt: skip
    lines.append(f"| total | {runs} | | | {total:.1f} ({wall}) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    plan_name, driver = PLANS[args.plan]
    study_plan = importlib.import_module(f"method_study.{plan_name}")
    driver = importlib.import_module(f"method_study.{driver}")
    preset = dict(driver.PRESETS[args.preset])
    if args.plan == "ssim_window":
        preset["image_size"] = driver.SIZE
    preset.update({k: v for k, v in (("image_size", args.image_size), ("batch", args.batch))
                   if v is not None})  # fmt: skip
    if args.plan == "ssim_window":
        table = window_rows(preset, args.seeds)
    else:
        table = rows(study_plan, preset, args.seeds)
    table = estimate(table, preset, args.steps)
    print(markdown(table, preset, parallel=args.plan != "ssim_window"))
    if args.output:
        from . import REPO

        for r in table:  # paths in the checkout, as the plan's configs are named in the docs
            r["config"] = os.path.relpath(r["config"], REPO)
        with open(args.output, "w") as f:
            json.dump({"plan": args.plan, "preset": preset, "steps": args.steps,
                       "threads": torch_threads(), "rows": table}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
