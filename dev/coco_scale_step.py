#!/usr/bin/env python
"""Every COCO config at its real input size: build it, run one training step on CPU, record peak
memory.

No COCO and no model-zoo weights are needed: each config's models (the model-zoo R101-FPN teacher,
the R50-FPN student, the online peers) are built with random weights made numerically sane by
``kd_det.utils.stand_in`` (each FrozenBN's scale set from the batch), and fed a batch of random
images of ``--height x --width`` (default 800 x 1333, detectron2's COCO training size) with boxes,
the per-GPU batch of the 8-GPU configs (2 images). The step is the one ``KDTrainer`` runs: AMP
(bfloat16 on CPU) where the config turns it on. Each config runs in its own process, so its peak
resident memory is its own.

    python dev/coco_scale_step.py --output output/coco_scale_step
"""

import argparse
import glob
import json
import math
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(REPO, "configs", "COCO-Distillation")


def runnable_configs():
    """The COCO configs a user runs (not the bases, not the online peers' own files)."""
    return sorted(
        os.path.relpath(p, COCO)
        for p in glob.glob(os.path.join(COCO, "*.yaml"))
        if not os.path.basename(p).startswith("Base")
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None, help="files in configs/COCO-Distillation")
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--batch", type=int, default=2, help="images per step (per GPU in the configs)")
    p.add_argument("--output", default=os.path.join(REPO, "output", "coco_scale_step"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config in this process
    return p.parse_args(argv)


def run_one(args):
    """Build ``args.one`` with stand-in weights and run one step; print a JSON line."""
    import itertools

    import torch
    from detectron2.modeling import build_model

    import kd_det  # noqa: F401
    from kd_det.config import get_kd_cfg
    from kd_det.engine.hooks import EMAUpdateHook
    from kd_det.engine.trainer import CPUAMPTrainer, KDSimpleTrainer
    from kd_det.utils.stand_in import calibrate_model, random_inputs

    os.chdir(REPO)
    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(COCO, args.one))
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    if cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN":
        opts += ["MODEL.KD.TEACHER.WEIGHTS", "", "MODEL.KD.TEACHER.ALLOW_RANDOM", "True",
                 "MODEL.KD.WARMUP_ITERS", "0"]  # fmt: skip
    if cfg.MODEL.META_ARCHITECTURE == "OnlineDistillationRCNN":
        opts += ["MODEL.ONLINE_KD.LOAD_PEER_WEIGHTS", "False", "MODEL.ONLINE_KD.EMA_WARMUP", "0",
                 "MODEL.ONLINE_KD.MUTUAL_WARMUP", "0"]  # fmt: skip
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(cfg)
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    inputs = random_inputs(args.batch, args.height, args.width, num_classes)
    calibrate_model(model, inputs)
    build_s = time.perf_counter() - start
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    trainer_cls = CPUAMPTrainer if cfg.SOLVER.AMP.ENABLED else KDSimpleTrainer
    trainer = trainer_cls(model, itertools.repeat(inputs), opt)
    if callable(getattr(model, "update_ema", None)):
        trainer.register_hooks([EMAUpdateHook(model)])
    start = time.perf_counter()
    trainer.train(0, 1)
    step_s = time.perf_counter() - start
    losses = {k: v[0] for k, v in trainer.storage.latest().items() if k.startswith("loss")}
    print(json.dumps({
        "config": args.one,
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "amp": bool(cfg.SOLVER.AMP.ENABLED),
        "input": f"{args.batch} x {args.height}x{args.width}",
        "build_and_calibrate_s": round(build_s, 1),
        "step_s": round(step_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "finite": all(math.isfinite(v) for v in losses.values()),
        "kd_terms": sorted(k for k in losses if k.startswith("loss_kd")),
    }))  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        return run_one(args)
    os.makedirs(args.output, exist_ok=True)
    results = []
    for config in args.configs or runnable_configs():
        cmd = [sys.executable, os.path.abspath(__file__), "--one", config]
        cmd += [
            "--height",
            str(args.height),
            "--width",
            str(args.width),
            "--batch",
            str(args.batch),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{config}: step {r['step_s']} s, peak {r['peak_rss_mb']} MB, finite {r['finite']}",
              flush=True)  # fmt: skip
        with open(os.path.join(args.output, "coco_scale_step.json"), "w") as f:
            json.dump(results, f, indent=1)
    lines = [
        "| config | AMP | step (s) | peak RSS (MB) | finite | KD terms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['config']} | {r['amp']} | {r['step_s']} | {r['peak_rss_mb']} | "
                     f"{r['finite']} | {len(r['kd_terms'])} |")  # fmt: skip
    md = "\n".join(lines)
    with open(os.path.join(args.output, "coco_scale_step.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
