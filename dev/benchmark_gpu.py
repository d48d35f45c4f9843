#!/usr/bin/env python
"""kd_det on a GPU in one command: step cost per method, the feature losses alone, and numerics.

Runs on a CUDA machine with no network and only kd_det's runtime packages (see dev/README.md for
carrying them), in one process, at the COCO configs' models: the model-zoo R101-FPN teacher and
the R50-FPN student (80 classes), with calibrated stand-in weights (``kd_det.utils.stand_in``:
random FrozenBN ResNets overflow float16, so each FrozenBN's scale is set from data). Sections:

* ``cost``: detectron2's training step (``KDTrainer``'s ``SimpleTrainer``, or the AMP trainer) on
  one repeated batch, no data loading, for each method variant, AMP off and on, at each batch
  size: median s/step, its ratio to the **floor** (the student's step plus the teacher's
  preprocessing and backbone forward under no_grad, what any feature distillation must pay) and
  to the student alone, peak memory and its ratios, and whether every loss was finite.
* ``losses``: each feature loss alone, forward and backward, on P2-P6 of a batch at 800 x 1216:
  milliseconds and peak memory above its inputs, the fused SSIM beside the reference.
* ``numerics``: each feature loss's value and gradient on the device against the CPU in float32,
  with TF32 matmuls on, and under float16 and bfloat16 autocast.
* ``floor``: the teacher's share of the floor at batch 2, and what channels-last or another
  autocast dtype for the teacher would change.

Prints Markdown tables with the targets of the fused-SSIM work beside the measurements, and writes
``benchmark_gpu.json`` / ``benchmark_gpu.md`` to ``--output`` after every measurement (a run cut
off by ``--budget`` keeps what it measured).

    python dev/benchmark_gpu.py --device cuda --output output/benchmark_gpu
"""

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import time

import torch
from detectron2.engine import HookBase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO = os.path.join(REPO, "configs", "COCO-Distillation")
R101_R50 = "faster_rcnn_R101_to_R50_FPN_1x_{}.yaml"
#: variant -> (config file, extra overrides)
VARIANTS = {
    "student": (R101_R50.format("ssim"), ["MODEL.KD.FEATURE.WEIGHTS", "[0.0]"]),
    "floor": (R101_R50.format("ssim"), ["MODEL.KD.FEATURE.WEIGHTS", "[0.0]"]),
    "pkd": (R101_R50.format("pkd"), []),
    "ssim": (R101_R50.format("ssim"), []),
    "ssim_reference": (R101_R50.format("ssim"), ["MODEL.KD.SSIM.IMPL", "reference"]),
    "multilevel": (R101_R50.format("multilevel"), []),
    "multilevel_ssim": (R101_R50.format("multilevel_ssim"), []),
    "dynamic": (R101_R50.format("dynamic"), []),
    "online": ("online_R50_R18_FPN_1x.yaml", [
        "MODEL.ONLINE_KD.LOAD_PEER_WEIGHTS", "False", "MODEL.ONLINE_KD.EMA_WARMUP", "0",
        "MODEL.ONLINE_KD.MUTUAL_WARMUP", "0"]),
}  # fmt: skip
#: Targets of the fused SSIM (issue "SSIM at the price of a cheap loss"), printed beside results.
TARGETS = {
    "ssim": "<= 1.05x floor time, <= 1.15x floor peak memory",
    "multilevel_ssim": "<= 1.20x floor time",
    "loss": "SSIM loss alone <= 10 ms fwd+bwd and <= 2 GB above its inputs (batch 8)",
}
LEVELS = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run at tiny size")
    p.add_argument("--output", default=os.path.join(REPO, "output", "benchmark_gpu"))
    p.add_argument("--sections", nargs="+", default=["numerics", "losses", "cost", "floor"],
                   choices=["numerics", "losses", "cost", "floor"])  # fmt: skip
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--size", type=int, default=800, help="square training images of this side")
    p.add_argument("--batches", nargs="+", type=int, default=[8, 2])
    p.add_argument("--amp", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--iters", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-batch", type=int, default=8, help="batch of the losses section")
    p.add_argument("--loss-size", nargs=2, type=int, default=[800, 1216], help="H W of its input")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; later parts are skipped")
    return p.parse_args(argv)


class Report:
    """Results so far, written as JSON and Markdown after every addition."""

    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.data = {"device": _device_name(args.device), "args": vars(args), "skipped": []}
        os.makedirs(args.output, exist_ok=True)

    def over_budget(self, what):
        if time.perf_counter() - self.start > self.args.budget:
            self.data["skipped"].append(what)
            self.write()
            return True
        return False

    def add(self, section, key, value):
        self.data.setdefault(section, {})[key] = value
        print(f"[{time.perf_counter() - self.start:6.1f}s] {section} {key}: "
              f"{json.dumps(value, default=str)[:200]}", flush=True)  # fmt: skip
        self.write()

    def write(self):
        with open(os.path.join(self.args.output, "benchmark_gpu.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        with open(os.path.join(self.args.output, "benchmark_gpu.md"), "w") as f:
            f.write(markdown(self.data) + "\n")


def _device_name(device):
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def _peak_mb(device, base=0):
    """Peak allocated memory since the last reset (CUDA), else the process's max RSS (CPU: not
    per variant, it never decreases)."""
    if device.startswith("cuda"):
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------- cost
def build_variant(variant, device, inputs):
    """The model of ``variant`` with calibrated stand-in weights, in training mode."""
    from detectron2.modeling import build_model

    from kd_det.config import get_kd_cfg
    from kd_det.utils.stand_in import calibrate_model

    config, extra = VARIANTS[variant]
    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(COCO, config))
    cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.WEIGHTS", ""] + extra)
    if cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN":
        cfg.merge_from_list(["MODEL.KD.TEACHER.WEIGHTS", "", "MODEL.KD.TEACHER.ALLOW_RANDOM",
                             "True", "MODEL.KD.WARMUP_ITERS", "0"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    if variant == "floor":
        from kd_det.modeling.teacher import build_teacher

        teacher, tcfg = build_teacher(cfg)
        model = _WithTeacherForward(model, teacher, cfg.INPUT.FORMAT, tcfg.INPUT.FORMAT)
        calibrate_model(model.student, inputs[:4])
        calibrate_model(teacher, inputs[:4])
    else:
        calibrate_model(model, inputs[:4])
    return model.train(), cfg


class _WithTeacherForward(torch.nn.Module):
    """The floor: the student's step plus the teacher's preprocessing and backbone forward."""

    def __init__(self, student, teacher, student_format, teacher_format):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # outside the module tree, like DistillationRCNN's teacher
        self.formats = (student_format, teacher_format)

    def forward(self, batched_inputs):
        from kd_det.modeling.common import convert_input_format

        losses = self.student(batched_inputs)
        teacher = self._teacher[0]
        with torch.no_grad():
            inputs = convert_input_format(batched_inputs, *self.formats)
            teacher.backbone(teacher.preprocess_image(inputs).tensor)
        return losses


class _StepTimer(HookBase):
    def __init__(self, device, warmup):
        self.device, self.warmup, self.times, self.last = device, warmup, [], {}

    def before_step(self):
        _sync(self.device)
        self._start = time.perf_counter()

    def after_step(self):
        _sync(self.device)
        if self.trainer.iter >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
        self.last = {k: v[0] for k, v in self.trainer.storage.latest().items() if "loss" in k}


def measure_step(variant, amp, batch, args):
    """s/step (median), peak MB and the last step's losses of one variant."""
    from kd_det.engine.hooks import EMAUpdateHook
    from kd_det.engine.trainer import CPUAMPTrainer, KDSimpleTrainer
    from kd_det.utils.stand_in import random_inputs

    device = args.device
    base = _peak_reset(device)
    inputs = random_inputs(batch, args.size, args.size, 80, device=device)
    model, cfg = build_variant(variant, device, inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    trainer_cls = CPUAMPTrainer if amp == "on" else KDSimpleTrainer
    trainer = trainer_cls(model, itertools.repeat(inputs), opt)
    timer = _StepTimer(device, args.warmup)
    hooks = [EMAUpdateHook(model)] if callable(getattr(model, "update_ema", None)) else []
    trainer.register_hooks(hooks + [timer])
    trainer.train(0, args.warmup + args.iters)
    result = {
        "s_per_step": statistics.median(timer.times),
        "peak_mb": _peak_mb(device, base),
        "finite": all(math.isfinite(v) for v in timer.last.values()),
        "kd_terms": sorted(k for k in timer.last if k.startswith("loss_kd")),
        "losses": {k: round(v, 5) for k, v in timer.last.items()},
    }
    del trainer, model, opt, params
    _peak_reset(device)
    return result


def cost_section(report, args):
    order = ["student", "floor"] + [v for v in args.variants if v not in ("student", "floor")]
    for batch, amp in itertools.product(args.batches, args.amp):
        for variant in order:
            if variant not in args.variants and variant not in ("student", "floor"):
                continue
            if report.over_budget(f"cost {variant} amp {amp} batch {batch}"):
                return
            key = f"{variant}|amp {amp}|batch {batch}"
            try:
                report.add("cost", key, measure_step(variant, amp, batch, args))
            except Exception as e:  # keep measuring the others; report what broke
                report.add("cost", key, {"error": f"{type(e).__name__}: {e}"[:500]})


# ------------------------------------------------------------------------------- losses
def _feature_losses(device):
    """name -> loss module, as the COCO configs build them."""
    from kd_det.modeling.losses import CWDFeatureLoss, LpFeatureLoss, PKDFeatureLoss
    from kd_det.modeling.losses import SSIMFeatureLoss

    paper = dict(win_size=11, range_policy="minmax", loss_form="(1-ssim)/2")
    out = {
        "mse": LpFeatureLoss(norm="mse"),
        "pkd": PKDFeatureLoss(),
        "cwd": CWDFeatureLoss(),
        "ssim_reference": SSIMFeatureLoss(**paper, impl="reference"),
    }
    if device.startswith("cuda"):
        out["ssim_fused"] = SSIMFeatureLoss(**paper, impl="fused")
    return out


def _fpn_pair(batch, h, w, device, channels=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for level, stride in LEVELS.items():
        shape = (batch, channels, -(-h // stride), -(-w // stride))
        t = torch.randn(shape, generator=gen)
        s = (0.7 * t + 0.5 * torch.randn(shape, generator=gen)).to(device)
        out.append((level, s, t.to(device)))
    return out


def losses_section(report, args):
    device = args.device
    pairs = _fpn_pair(args.loss_batch, *args.loss_size, device)
    for name, loss in _feature_losses(device).items():
        if report.over_budget(f"losses {name}"):
            return
        leaves = [s.detach().clone().requires_grad_() for _, s, _ in pairs]

        def step():
            total = sum(loss(x, t) for x, (_, _, t) in zip(leaves, pairs))
            total.backward()
            return total

        try:
            step()  # warm-up (kernel compilation, caches)
            base = _peak_reset(device)
            times = []
            for _ in range(5):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - start)
            ms = 1000 * statistics.median(times)
            report.add("losses", name, {"ms": ms, "peak_mb_above_inputs": _peak_mb(device, base)})
        except Exception as e:
            report.add("losses", name, {"error": f"{type(e).__name__}: {e}"[:500]})


# ----------------------------------------------------------------------------- numerics
def _value_and_grad(loss, s, t, device, mode):
    """Loss value and the student's gradient, computed on ``device`` in ``mode``."""
    x = s.detach().to(device)
    y = t.detach().to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    scale = 1.0
    try:
        if mode == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if mode in ("fp16", "bf16"):
            dtype = torch.float16 if mode == "fp16" else torch.bfloat16
            x, y = x.to(dtype), y.to(dtype)
            # As under GradScaler: fp16 gradients of a mean over millions of elements underflow.
            scale = 2.0**16 if mode == "fp16" else 1.0
        x.requires_grad_()
        autocast = mode in ("fp16", "bf16")
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        with torch.autocast(dev_type, dtype=x.dtype, enabled=autocast):
            value = loss(x, y)
        (value * scale).backward()
        return float(value), (x.grad.float() / scale).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def numerics_section(report, args):
    """Relative error of value and gradient (norm of the difference over the norm) against the
    CPU in float32, on P2 and P4 of a batch of 2 at the losses section's size."""
    pairs = [p for p in _fpn_pair(2, *args.loss_size, "cpu") if p[0] in ("p2", "p4")]
    modes = ["fp32", "tf32", "fp16", "bf16"]
    for name, loss in _feature_losses(args.device).items():
        cpu_loss = _feature_losses("cpu").get(name.replace("_fused", "_reference"))
        for level, s, t in pairs:
            if report.over_budget(f"numerics {name} {level}"):
                return
            ref_v, ref_g = _value_and_grad(cpu_loss, s, t, "cpu", "fp32")
            row = {}
            for mode in modes:
                try:
                    v, g = _value_and_grad(loss, s, t, args.device, mode)
                    row[mode] = {
                        "value": abs(v - ref_v) / max(abs(ref_v), 1e-12),
                        "grad": float((g - ref_g).norm() / ref_g.norm().clamp_min(1e-30)),
                        "finite": math.isfinite(v) and bool(torch.isfinite(g).all()),
                    }
                except Exception as e:
                    row[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
            report.add("numerics", f"{name}|{level}", row)


# -------------------------------------------------------------------------------- floor
def floor_section(report, args):
    """At batch 2: the student step, the teacher's forward alone under each setting."""
    from kd_det.utils.stand_in import random_inputs

    device = args.device
    if report.over_budget("floor"):
        return
    inputs = random_inputs(2, args.size, args.size, 80, device=device)
    model, _ = build_variant("floor", device, inputs)
    teacher = model._teacher[0]
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    settings = {
        "fp32": (None, False),
        "autocast fp16": (torch.float16, False),
        "autocast bf16": (torch.bfloat16, False),
        "autocast fp16 + channels_last": (torch.float16, True),
    }
    for name, (dtype, channels_last) in settings.items():
        if dtype is not None and dev_type == "cpu" and dtype == torch.float16:
            continue
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        times = []
        for i in range(args.warmup + args.iters):
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast(dev_type, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):  # fmt: skip
                images = teacher.preprocess_image(inputs).tensor
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                teacher.backbone(images)
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        report.add("floor", f"teacher forward, {name}", {"s": statistics.median(times)})
    report.add("floor", "student step (amp on)", measure_step("student", "on", 2, args))


# ------------------------------------------------------------------------------ markdown
def markdown(data):
    lines = [f"# kd_det GPU benchmark on {data['device']}", ""]
    cost = {k: v for k, v in data.get("cost", {}).items() if "error" not in v}
    if cost:
        lines += [
            "| variant | AMP | batch | s/step | x floor | x student | peak MB | x floor "
            "| x student | finite |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in cost.items():
            variant, amp, batch = key.split("|")
            floor = cost.get(f"floor|{amp}|{batch}")
            student = cost.get(f"student|{amp}|{batch}")

            def ratio(field, ref):
                return f"{r[field] / ref[field]:.2f}" if ref else "-"

            lines.append(
                f"| {variant} | {amp[4:]} | {batch[6:]} | {r['s_per_step']:.3f} | "
                f"{ratio('s_per_step', floor)} | {ratio('s_per_step', student)} | "
                f"{r['peak_mb']:.0f} | {ratio('peak_mb', floor)} | {ratio('peak_mb', student)} | "
                f"{r['finite']} |"
            )
        lines += ["", "Targets: " + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()), ""]
    for section in ("cost", "losses", "numerics", "floor"):
        errors = {k: v for k, v in data.get(section, {}).items() if "error" in v}
        for k, v in errors.items():
            lines.append(f"- {section} {k}: **{v['error']}**")
    if data.get("losses"):
        lines += ["", "| loss alone (P2-P6) | ms fwd+bwd | peak MB above inputs |", "|---|---|---|"]
        for k, v in data["losses"].items():
            if "error" not in v:
                lines.append(f"| {k} | {v['ms']:.1f} | {v['peak_mb_above_inputs']:.0f} |")
    if data.get("numerics"):
        lines += ["", "| loss, level | " + " | ".join(["fp32", "tf32", "fp16", "bf16"]) + " |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for k, row in data["numerics"].items():
            cells = [
                (f"{c['value']:.1e} / {c['grad']:.1e}" + ("" if c["finite"] else " NaN"))
                if "error" not in c else "error" for c in row.values()
            ]  # fmt: skip
            lines.append(f"| {k.replace('|', ', ')} | " + " | ".join(cells) + " |")
        lines.append("\n(relative error of value / gradient against the CPU in float32)")
    if data.get("floor"):
        lines += [""] + [
            f"- {k}: {v.get('s', v.get('s_per_step', 0)):.4f} s" for k, v in data["floor"].items()
        ]
    if data.get("skipped"):
        lines.append(f"\nSkipped (budget): {', '.join(data['skipped'])}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import kd_det  # noqa: F401  (registers the meta-architectures)

    os.chdir(REPO)  # config files name each other relative to the repository
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu for a dry run.")
    report = Report(args)
    sections = {"numerics": numerics_section, "losses": losses_section, "cost": cost_section,
                "floor": floor_section}  # fmt: skip
    for name in args.sections:
        sections[name](report, args)
    report.write()
    print(markdown(report.data))


if __name__ == "__main__":
    main()
