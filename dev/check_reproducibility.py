#!/usr/bin/env python
"""Which settings change a training run's numbers: threads, loader workers, CPU instruction set.

Trains the same tiny run (generated data, a few iterations) once per variant, each in its own
process, and compares the final weights with the reference run bit for bit:

* ``reference``: 1 thread, no loader workers, the machine's own instruction set;
* ``workers2``: two data-loader worker processes (kd_det's loader: must not matter);
* ``threads2``: two compute threads (parallel reductions may add in another order);
* ``isa_sse41``: torch's and oneDNN's kernels capped at SSE4.1 (what an older CPU would run);
* ``isa_avx2_cap``: capped at AVX2 (``ISA_CAP``; on an AVX2 machine the same as the reference, on
  an AVX-512 machine what kd_det's demo and study use so both kinds of machine agree).

    python dev/check_reproducibility.py --output output/repro
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from kd_det.utils.runs import ISA_CAP  # noqa: E402

#: Environment of each variant (on top of OMP_NUM_THREADS=1 and NUM_WORKERS 0).
VARIANTS = {
    "reference": ({}, []),
    "workers2": ({}, ["DATALOADER.NUM_WORKERS", "2"]),
    "threads2": ({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}, []),
    "isa_sse41": ({"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                   "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}, []),  # fmt: skip
    "isa_avx2_cap": (dict(ISA_CAP), []),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(REPO, "output", "repro"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--config-file",
        default=os.path.join(REPO, "configs", "Synthetic", "faster_rcnn_lite0_FPN.yaml"),
    )
    return p.parse_args(argv)


def _weights(path):
    from kd_det.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def main(argv=None):
    import torch

    from kd_det.data.synthetic import generate_dataset

    args = parse_args(argv)
    data = os.path.join(args.output, "data")
    generate_dataset(data, 32, 8, 96, 0, show_progress=False)
    opts = ["DATASETS.SYNTHETIC_ROOT", data, "DATASETS.TRAIN", "('synthetic_repro_train',)",
            "DATASETS.TEST", "('synthetic_repro_val',)", "INPUT.MIN_SIZE_TRAIN", "(96,)",
            "INPUT.MIN_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER",
            str(args.iters), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2",
            "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "SEED", "0",
            "MODEL.KD.TEACHER.MIN_AP", "0.0"]  # fmt: skip
    rows, ref, t0 = [], None, time.time()
    for k, name in enumerate(args.variants):
        env_extra, extra = VARIANTS[name]
        out = os.path.join(args.output, name)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
            env.pop(key, None)
        env.update(env_extra)
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
               args.config_file] + opts + extra + ["OUTPUT_DIR", out]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        w = _weights(os.path.join(out, "model_final.pth"))
        if ref is None:
            ref = w
        diff = max(float((w[n].double() - ref[n].double()).abs().max()) for n in ref
                   if torch.is_tensor(ref[n]) and ref[n].is_floating_point())  # fmt: skip
        rows.append({"variant": name, "env": env_extra, "opts": extra,
                     "bit_identical": diff == 0.0, "max_abs_weight_diff": diff})  # fmt: skip
        eta = (time.time() - t0) / (k + 1) * (len(args.variants) - k - 1)
        print(f"[repro] {k + 1}/{len(args.variants)} {name}: max |dw| = {diff:.3g} "
              f"(ETA {eta / 60:.1f} min)", flush=True)  # fmt: skip
    lines = ["| variant | settings | final weights vs reference |", "|---|---|---|"]
    for r in rows:
        settings = " ".join(f"{k}={v}" for k, v in r["env"].items()) + " " + " ".join(r["opts"])
        same = (
            "bit-identical"
            if r["bit_identical"]
            else f"differ (max {r['max_abs_weight_diff']:.2g})"
        )
        lines.append(f"| {r['variant']} | `{settings.strip() or 'defaults'}` | {same} |")
    text = "\n".join(lines)
    with open(os.path.join(args.output, "reproducibility.json"), "w") as f:
        json.dump({"iters": args.iters, "rows": rows}, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
