#!/usr/bin/env python
"""Does a refactor change what kd_det trains? Short runs at two commits, compared bit for bit.

A restructure that claims "behaviour unchanged" must show it end to end, not only in unit tests:
this tool checks out ``--base`` in a temporary git worktree, runs the same ``tools/train_net.py``
commands with the base's code and with this checkout's code (one thread, data loaded in-process,
kernels capped as in ``kd_det/utils/runs.py``), and compares every run's final weights tensor by
tensor and its final COCO AP. Both trees read the same generated dataset and, for distillation runs,
the same teacher checkpoint (trained once, with this checkout's code).

Each row of the table is one method with every setting held fixed; "identical" means every tensor
of ``model_final.pth`` is ``torch.equal``. Writes ``equivalence.md`` and ``equivalence.json``.

    python dev/check_equivalence.py --base d154d86   # the last commit before the restructure
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from kd_det.utils.runs import ISA_CAP  # noqa: E402

SYN = "configs/Synthetic"
#: name -> (config relative to the repository, extra overrides, needs the teacher)
RUNS = {
    "student": (f"{SYN}/faster_rcnn_lite0_FPN.yaml", [], False),
    "student_cutmix": (
        f"{SYN}/faster_rcnn_lite0_FPN.yaml",
        ["INPUT.MIX.ENABLED", "True", "INPUT.MIX.TYPE", "cutmix", "INPUT.MIX.PROB", "0.5",
         "INPUT.MIX.PARTNER_CACHE_SIZE", "0"],
        False,
    ),
    "ssim": (f"{SYN}/distill_lite2_to_lite0_ssim.yaml", ["MODEL.KD.WARMUP_ITERS", "10"], True),
    "mse": (f"{SYN}/distill_lite2_to_lite0_mse.yaml", [], True),
    "multilevel": (f"{SYN}/distill_lite2_to_lite0_multilevel.yaml", [], True),
    "dynamic": (f"{SYN}/distill_lite2_to_lite0_ssim_dynamic.yaml", [], True),
    # Every online term on from the start: no warm-up (the one rule the restructure changed on
    # purpose, commit f494120) and EMA teachers active.
    "online": (
        f"{SYN}/online_lite0_x2.yaml",
        ["MODEL.ONLINE_KD.MUTUAL_WARMUP", "0", "MODEL.ONLINE_KD.EMA_WARMUP", "0",
         "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "1.0", "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[1.0]"],
        False,
    ),
}  # fmt: skip
TEACHER = f"{SYN}/faster_rcnn_lite2_FPN.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the commit to compare this checkout against")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-train", type=int, default=24)
    p.add_argument("--num-val", type=int, default=16)
    p.add_argument("--output", default=os.path.join(REPO, "output", "equivalence"))
    return p.parse_args(argv)


def common_opts(args, data):
    return [
        "DATASETS.SYNTHETIC_ROOT", data,
        "DATASETS.TRAIN", "('synthetic_train',)", "DATASETS.TEST", "('synthetic_val',)",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
        "INPUT.MIN_SIZE_TRAIN", f"({args.image_size},)",
        "INPUT.MIN_SIZE_TEST", str(args.image_size),
        "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.MAX_ITER", str(args.iters),
        "SOLVER.STEPS", f"({2 * args.iters // 3},)", "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0",
    ]  # fmt: skip


def train(tree, config, opts, out, log):
    """One ``tools/train_net.py`` run with ``tree``'s code; returns its final AP."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **ISA_CAP)
    cmd = [sys.executable, os.path.join(tree, "tools", "train_net.py"), "--config-file",
           os.path.join(tree, config)] + opts + ["OUTPUT_DIR", out]  # fmt: skip
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nfailed ({proc.returncode}); see {log}")
    with open(os.path.join(out, "final_results.json")) as f:
        return json.load(f)["bbox"]["AP"]


def compare(a_path, b_path):
    """(identical, number of tensors, tensors that differ, max |difference|) of two checkpoints."""
    import torch

    from kd_det.checkpoint import load_checkpoint

    a = load_checkpoint(a_path)["model"]
    b = load_checkpoint(b_path)["model"]
    if set(a) != set(b):
        diff = sorted(set(a) ^ set(b))
        raise SystemExit(f"{a_path} and {b_path} hold different tensors: {diff[:5]} ...")
    differ, worst = 0, 0.0
    for k in a:
        if not torch.equal(a[k], b[k]):
            differ += 1
            if a[k].is_floating_point():
                worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
    return differ == 0, len(a), differ, worst


def main(argv=None):
    args = parse_args(argv)
    from tqdm import tqdm

    from kd_det.data.synthetic import generate_dataset

    out = os.path.abspath(args.output)
    base_tree = os.path.join(out, "base_tree")
    sha = subprocess.check_output(["git", "rev-parse", args.base], cwd=REPO, text=True).strip()
    head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    if os.path.exists(base_tree):
        subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=REPO, check=False)
        shutil.rmtree(base_tree, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    subprocess.run(["git", "worktree", "add", "--detach", base_tree, sha], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    try:
        data = os.path.join(out, "data")
        generate_dataset(data, args.num_train, args.num_val, args.image_size, 0)
        opts = common_opts(args, data)
        teacher = None
        steps = len(args.runs) * 2 + any(RUNS[r][2] for r in args.runs)
        bar = tqdm(total=steps, desc="equivalence", unit="run")
        if any(RUNS[r][2] for r in args.runs):
            tdir = os.path.join(out, "teacher")
            train(REPO, TEACHER, opts, tdir, os.path.join(out, "teacher.log"))
            teacher = os.path.join(tdir, "model_final.pth")
            bar.update()
        rows = []
        for name in args.runs:
            config, extra, needs_teacher = RUNS[name]
            run_opts = (
                opts
                + extra
                + (
                    # A teacher of a few iterations is weak: its check logs AP instead of refusing.
                    ["MODEL.KD.TEACHER.WEIGHTS", teacher, "MODEL.KD.TEACHER.MIN_AP", "0.0"]
                    if needs_teacher
                    else []
                )
            )
            result = {"run": name}
            for side, tree in (("base", base_tree), ("head", REPO)):
                bar.set_postfix_str(f"{name} ({side})")
                d = os.path.join(out, side, name)
                shutil.rmtree(d, ignore_errors=True)
                t0 = time.time()
                result[f"{side}_ap"] = train(tree, config, run_opts, d, d + ".log")
                result[f"{side}_s"] = time.time() - t0
                bar.update()
            same, n, differ, worst = compare(
                os.path.join(out, "base", name, "model_final.pth"),
                os.path.join(out, "head", name, "model_final.pth"),
            )
            result.update(identical=same, tensors=n, differ=differ, max_abs_diff=worst)
            rows.append(result)
        bar.close()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=REPO, check=False)
    lines = [
        f"Base {sha[:7]} vs this checkout {head[:7]}: {args.iters} iterations, batch {args.batch} "
        f"x {args.image_size} px, {args.num_train} train / {args.num_val} val images, 1 thread.",
        "",
        "| run | AP base | AP now | weights | tensors that differ | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['base_ap']:.2f} | {r['head_ap']:.2f} | "
            f"{'identical' if r['identical'] else 'DIFFER'} | {r['differ']} / {r['tensors']} | "
            f"{r['max_abs_diff']:.3g} |"
        )
    md = "\n".join(lines)
    with open(os.path.join(out, "equivalence.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "equivalence.json"), "w") as f:
        json.dump({"base": sha, "head": head, "args": vars(args), "runs": rows}, f, indent=2)
    print(md)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
