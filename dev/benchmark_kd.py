#!/usr/bin/env python
"""Cost of distillation: time per training iteration and peak memory, as ratios to the student
alone.

Variants (all on the same student, batch and input, in one run):

* ``student``: the student alone (plain ``GeneralizedRCNN`` training step).
* ``teacher_forward``: the student step plus the teacher's preprocessing and backbone forward under
  ``no_grad`` -- the floor of any feature distillation's overhead.
* ``mse``, ``ssim``: ``DistillationRCNN`` with MSE or SSIM hints on P2-P6.
* ``multilevel``: SSIM on P2-P6 + res2, RPN objectness, ROI class KL and box deltas.
* ``dynamic``: SSIM hints with hint-dynamic per-instance weights (its weight network and its
  gradient-alignment objective included).
* ``online``: ``OnlineDistillationRCNN`` with two students as peers (mutual SSIM + ROI KL, EMA
  teachers active from the first step), i.e. the cost of training two detectors together.

Each variant runs in its own subprocess so that its peak memory (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on a GPU) is its own. Times are medians over ``--iters``
iterations after ``--warmup``; the teacher has random weights (cost does not depend on them).
Writes JSON and a Markdown table.

    python dev/benchmark_kd.py --output output/benchmark_kd
"""

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from detectron2.engine import HookBase, SimpleTrainer

from kd_det.engine.hooks import EMAUpdateHook
from kd_det.modeling.common import convert_input_format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("student", "teacher_forward", "mse", "ssim", "multilevel", "dynamic", "online")
ONLINE = os.path.join(REPO, "configs", "Synthetic", "online_lite0_x2.yaml")
DYNAMIC = os.path.join(REPO, "configs", "Synthetic", "distill_lite2_to_lite0_ssim_dynamic.yaml")
KD_OFF = ["MODEL.KD.FEATURE.WEIGHTS", "[0.0]"]
MULTI = [
    "MODEL.KD.BACKBONE.LEVELS", "['res2']",
    "MODEL.KD.RPN.OBJECTNESS_WEIGHT", "1.0",
    "MODEL.KD.ROI.CLS_WEIGHT", "1.0",
    "MODEL.KD.ROI.BOX_WEIGHT", "1.0",
]  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config-file",
        default=os.path.join(REPO, "configs", "Synthetic", "distill_lite2_to_lite0_ssim.yaml"),
        help="a DistillationRCNN config (student + teacher)",
    )
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--output", default=os.path.join(REPO, "output", "benchmark_kd"))
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def _batch(n, size, num_classes, device):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        k = 6
        xy = torch.rand(k, 2, generator=g) * (size * 0.7)
        wh = 8 + torch.rand(k, 2, generator=g) * (size * 0.3)
        inst.gt_boxes = Boxes(torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1))
        inst.gt_classes = torch.randint(0, num_classes, (k,), generator=g)
        img = torch.randint(0, 256, (3, size, size), generator=g).float()
        out.append({"image": img.to(device), "instances": inst})
    return out


class _WithTeacherForward(torch.nn.Module):
    """The student's training step plus the teacher's input conversion, preprocessing and
    backbone forward under ``no_grad``: the floor of any feature distillation's overhead."""

    def __init__(self, student, cfg):
        from kd_det.modeling.teacher import build_teacher

        super().__init__()
        self.student = student
        teacher, tcfg = build_teacher(cfg)
        self._teacher = [teacher]  # a list: outside this module's parameters and state_dict
        self.formats = (cfg.INPUT.FORMAT, tcfg.INPUT.FORMAT)

    def forward(self, batched_inputs):
        losses = self.student(batched_inputs)
        teacher = self._teacher[0]
        with torch.no_grad():
            inputs = convert_input_format(batched_inputs, *self.formats)
            teacher.backbone(teacher.preprocess_image(inputs).tensor)
        return losses


class _StepTimer(HookBase):
    """Wall time of every step after the first ``warmup`` (optimizer step and hooks before it
    included), and the names of the distillation losses of the last step."""

    def __init__(self, device, warmup):
        self.device, self.warmup = device, warmup
        self.times, self.losses = [], []

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def before_step(self):
        self._sync()
        self._start = time.perf_counter()

    def after_step(self):
        self._sync()
        if self.trainer.iter >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
        self.losses = [k for k in self.trainer.storage.latest() if k.startswith("loss_kd")]


def run_variant(args):
    """Measure one variant in this process; print a JSON line."""
    from detectron2.modeling import build_model

    import kd_det  # noqa: F401
    from kd_det.config import get_kd_cfg

    os.chdir(REPO)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    v = args.variant
    cfg = get_kd_cfg()
    # The online variant trains two copies of the student; the others wrap it with the teacher.
    cfg.merge_from_file({"online": ONLINE, "dynamic": DYNAMIC}.get(v, args.config_file))
    cfg.merge_from_list(args.opts)
    if v == "online":
        # Every online term on (mutual and EMA), whatever the CPU config's defaults.
        cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.ONLINE_KD.EMA_WARMUP", "0",
                             "MODEL.ONLINE_KD.MUTUAL_WARMUP", "0",
                             "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[1.0]",
                             "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "1.0",
                             "MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "1.0"])  # fmt: skip
    else:
        cfg.merge_from_list(
            ["MODEL.DEVICE", device, "MODEL.KD.TEACHER.WEIGHTS", "",
             "MODEL.KD.TEACHER.ALLOW_RANDOM", "True", "MODEL.KD.WARMUP_ITERS", "0"]
        )  # fmt: skip
    if v in ("student", "teacher_forward"):
        cfg.merge_from_list(KD_OFF)
    elif v == "mse":
        cfg.merge_from_list(["MODEL.KD.FEATURE.LOSS", "mse"])
    elif v == "ssim":
        cfg.merge_from_list(["MODEL.KD.FEATURE.LOSS", "ssim"])
    elif v == "multilevel":
        cfg.merge_from_list(["MODEL.KD.FEATURE.LOSS", "ssim"] + MULTI)
    elif v == "dynamic" and cfg.MODEL.KD.HINT_WEIGHTING != "dynamic":
        raise SystemExit(f"{DYNAMIC} does not set MODEL.KD.HINT_WEIGHTING dynamic.")
    torch.manual_seed(0)
    model = build_model(cfg)
    if v == "teacher_forward":
        model = _WithTeacherForward(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    batch = _batch(args.batch, args.image_size, cfg.MODEL.ROI_HEADS.NUM_CLASSES, device)
    # detectron2's own training step (SimpleTrainer.run_step) on a loader that repeats one batch:
    # what is timed is what KDTrainer runs, minus data loading.
    trainer = SimpleTrainer(model, itertools.repeat(batch), opt)
    timer = _StepTimer(device, args.warmup)
    step_hooks = [EMAUpdateHook(model)] if hasattr(model, "update_ema") else []
    trainer.register_hooks(step_hooks + [timer])
    trainer.train(0, args.warmup + args.iters)
    times, losses = timer.times, timer.losses
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"variant": v, "median_s": statistics.median(times), "times": times,
                      "peak_mb": peak_mb, "device": device,
                      "losses": sorted(k for k in losses if k.startswith("loss_kd"))}))  # fmt: skip


def _variant_cmd(args, v):
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--config-file",
           args.config_file, "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--iters", str(args.iters), "--warmup", str(args.warmup)]  # fmt: skip
    if args.device:
        cmd += ["--device", args.device]
    return cmd + list(args.opts)


def _result(proc, v):
    if proc.returncode != 0:
        raise SystemExit(f"variant {v} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args):
    """Run every variant of ``args.variants`` in its own subprocess; return
    ``{variant: result}``."""
    from tqdm import tqdm

    results = {}
    bar = tqdm(args.variants, desc="benchmark_kd", unit="variant")
    for v in bar:
        bar.set_postfix_str(v)
        proc = subprocess.run(_variant_cmd(args, v), capture_output=True, text=True, cwd=REPO)
        results[v] = _result(proc, v)
    return results


def measure_side_by_side(args, jobs=2, variant="student"):
    """``jobs`` copies of one variant at the same time, each with ``cores // jobs`` threads.

    Small CPU detectors use extra intra-op threads poorly, so independent runs side by side (what
    ``method_study.run_study --jobs`` does) can finish more training per hour than one run using
    every core. Returns each copy's result; compare ``jobs / median`` to ``1 / median`` of the
    variant measured alone.
    """
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    procs = [
        subprocess.Popen(_variant_cmd(args, variant), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)  # fmt: skip
        for _ in range(jobs)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        out.append(
            _result(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), variant)
        )
    return out


def markdown(results, args):
    """The Markdown table: seconds and peak memory per variant, and their ratios to the student."""
    base = results.get("student")
    lines = [
        f"Device: {next(iter(results.values()))['device']}; batch {args.batch} x "
        f"{args.image_size}px; median of {args.iters} iterations after {args.warmup} warm-up.",
        "",
        "| variant | s / iter | x student | peak MB | x student |",
        "|---|---|---|---|---|",
    ]
    for v, r in results.items():
        t_ratio = r["median_s"] / base["median_s"] if base else float("nan")
        m_ratio = r["peak_mb"] / base["peak_mb"] if base else float("nan")
        lines.append(
            f"| {v} | {r['median_s']:.3f} | {t_ratio:.2f} | {r['peak_mb']:.0f} | {m_ratio:.2f} |"
        )
    if base and "teacher_forward" in results:
        tf = results["teacher_forward"]["median_s"]
        for v in ("mse", "ssim", "multilevel", "dynamic"):
            if v in results:
                extra = (results[v]["median_s"] - tf) / base["median_s"]
                lines.append(f"\n{v}: losses on top of the teacher forward cost {extra:+.1%} of a "
                             "student iteration.")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.variant:
        return run_variant(args)
    os.makedirs(args.output, exist_ok=True)
    results = measure(args)
    md = markdown(results, args)
    with open(os.path.join(args.output, "benchmark_kd.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "opts"},
                   "results": results}, f, indent=2)  # fmt: skip
    with open(os.path.join(args.output, "benchmark_kd.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
