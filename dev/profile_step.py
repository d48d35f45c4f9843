#!/usr/bin/env python
"""Where a CPU training step's time goes: data loading, student forward, teacher forward,
distillation losses, backward and optimizer step, for the student alone and with SSIM or
multi-level distillation, at several data-loader worker counts.

Each (method, workers) pair runs in its own process with the real training loader
(``KDTrainer.build_train_loader``) on generated data, so worker processes compete with the compute
threads exactly as in ``tools/train_net.py``. Parts are timed with ``time.perf_counter`` around
the model's own calls (no profiler overhead); ``student forward`` is the forward pass minus the
teacher and the distillation terms. The teacher has random weights unless ``--teacher-weights`` is
given (cost does not depend on the weights). Prints a Markdown table of medians (seconds per
iteration) and writes ``<output>/profile.json``.

    python dev/profile_step.py --output output/profile
    python dev/profile_step.py --methods ssim --workers 0 2 --iters 5 --warmup 1   # quick look
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = os.path.join(REPO, "configs", "Synthetic")
CONFIGS = {
    "student": os.path.join(SYN, "faster_rcnn_lite0_FPN.yaml"),
    "ssim": os.path.join(SYN, "distill_lite2_to_lite0_ssim.yaml"),
    "multilevel": os.path.join(SYN, "distill_lite2_to_lite0_multilevel.yaml"),
}
PARTS = ("data", "student_forward", "teacher_forward", "kd_losses", "backward", "optimizer")
#: The settings ``compare`` times against each other: kd_det before this release's speed-ups
#: (torchvision's ROIAlign backward, the synthetic configs' two loader workers) and after (the
#: bit-identical compiled backward, data loaded in the training process).
SETTINGS = {
    "before": ["KD_TRAINER.FAST_CPU_ROI_ALIGN", "False", "DATALOADER.NUM_WORKERS", "2"],
    "after": ["KD_TRAINER.FAST_CPU_ROI_ALIGN", "True", "DATALOADER.NUM_WORKERS", "0"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iters", type=int, default=12, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--data", default=os.path.join(REPO, "output", "profile_data"))
    p.add_argument("--teacher-weights", default="")
    p.add_argument("--output", default=os.path.join(REPO, "output", "profile"))
    p.add_argument(
        "--ops",
        action="store_true",
        help="also print torch.profiler's most expensive operators of each run",
    )
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: method workers
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


class _Clock:
    """Accumulates seconds per part within one iteration."""

    def __init__(self):
        self.parts = {}

    @contextlib.contextmanager
    def part(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, obj, attr, name):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            with self.part(name):
                return fn(*a, **k)

        setattr(obj, attr, timed)


def profile_one(args, method, workers):
    """Time ``args.iters`` iterations of one method with ``workers`` loader workers."""
    import torch
    from detectron2.utils.events import EventStorage

    import kd_det  # noqa: F401
    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config
    from kd_det.engine import KDTrainer

    os.chdir(REPO)
    cfg = get_kd_cfg()
    cfg.merge_from_file(CONFIGS[method])
    cfg.merge_from_list(
        ["DATASETS.SYNTHETIC_ROOT", args.data, "DATASETS.TRAIN", "('synthetic_profile_train',)",
         "DATASETS.TEST", "('synthetic_profile_val',)", "DATALOADER.NUM_WORKERS", str(workers),
         "INPUT.MIN_SIZE_TRAIN", f"({args.image_size},)", "SOLVER.IMS_PER_BATCH", str(args.batch)]
        + list(args.opts)
    )  # fmt: skip
    if cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN":
        w = args.teacher_weights
        cfg.merge_from_list(["MODEL.KD.TEACHER.WEIGHTS", w, "MODEL.KD.TEACHER.ALLOW_RANDOM",
                             str(not w), "MODEL.KD.WARMUP_ITERS", "0"])  # fmt: skip
    register_datasets_from_config(cfg)
    torch.manual_seed(0)
    model = KDTrainer.build_model(cfg)
    optimizer = KDTrainer.build_optimizer(cfg, model)
    loader = iter(KDTrainer.build_train_loader(cfg))
    clock = _Clock()
    if hasattr(model, "_teacher_forward"):
        clock.wrap(model, "_teacher_forward", "teacher_forward")
        clock.wrap(model, "distillation_terms", "kd_terms_total")
    rows = []
    model.train()
    profiler = contextlib.nullcontext()
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
    with EventStorage(0) as storage, profiler as prof:
        for i in range(args.warmup + args.iters):
            clock.parts = {}
            start = time.perf_counter()
            with clock.part("data"):
                batch = next(loader)
            with clock.part("forward"):
                losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            with clock.part("backward"):
                total.backward()
            with clock.part("optimizer"):
                optimizer.step()
            storage.step()
            p = clock.parts
            kd_total = p.pop("kd_terms_total", 0.0)
            p["teacher_forward"] = p.get("teacher_forward", 0.0)
            p["kd_losses"] = kd_total - p["teacher_forward"]
            p["student_forward"] = p.pop("forward") - kd_total
            p["total"] = time.perf_counter() - start
            if i >= args.warmup:
                rows.append(dict(p))
    if args.ops:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(f"Operators of {method} (workers {workers}; warm-up iterations included):\n{table}",
              file=sys.stderr)  # fmt: skip
    return {k: statistics.median(r[k] for r in rows) for k in PARTS + ("total",)}


def _run_one(args, method, workers, opts):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method, str(workers)]
    cmd += ["--ops"] if args.ops else []
    cmd += ["--iters", str(args.iters), "--warmup", str(args.warmup), "--image-size",
            str(args.image_size), "--batch", str(args.batch), "--data", args.data,
            "--teacher-weights", args.teacher_weights] + list(opts)  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if args.ops:
        start = out.stderr.find("Operators of")
        print(out.stderr[start:] if start >= 0 else "", flush=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"{method} with {workers} workers failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def compare(args, methods, pairs=2):
    """s/iter of each method under ``SETTINGS["before"]`` and ``["after"]``, measured as
    ``pairs`` alternating before/after processes (so drift of the machine hits both alike).

    Returns:
        list[dict]: per method, the median s/iter of each setting and their ratio.
    """
    from kd_det.data.synthetic import generate_dataset

    generate_dataset(args.data, 200, 20, args.image_size, 0, show_progress=False)
    rows, t0, total = [], time.time(), len(methods) * pairs * 2
    for m in methods:
        times = {"before": [], "after": []}
        for _ in range(pairs):
            for name, opts in SETTINGS.items():
                # The worker count is an override too: the last NUM_WORKERS wins.
                times[name].append(_run_one(args, m, 0, opts)["total"])
                done = sum(len(v) for r in rows for v in r["runs"].values()) + sum(
                    len(v) for v in times.values())  # fmt: skip
                eta = (time.time() - t0) / done * (total - done)
                print(f"[benchmark] {done}/{total} {m} {name}: {times[name][-1]:.3f} s/iter "
                      f"(ETA {eta / 60:.1f} min)", flush=True)  # fmt: skip
        before, after = (statistics.median(times[k]) for k in ("before", "after"))
        rows.append({"method": m, "before_s": before, "after_s": after,
                     "speedup": before / after, "runs": times})  # fmt: skip
    return rows


def compare_markdown(rows):
    lines = ["| method | before (s/iter) | after (s/iter) | speed-up |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['before_s']:.3f} | {r['after_s']:.3f} | "
                     f"x{r['speedup']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def markdown(results):
    head = "| method | workers | " + " | ".join(PARTS) + " | total s/iter |"
    lines = [head, "|---|---|" + "---|" * (len(PARTS) + 1)]
    for r in results:
        cells = [f"{r['parts'][k]:.3f}" for k in PARTS] + [f"**{r['parts']['total']:.3f}**"]
        lines.append(f"| {r['method']} | {r['workers']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(profile_one(args, args.one[0], int(args.one[1]))))
        return
    from kd_det.data.synthetic import generate_dataset

    generate_dataset(args.data, 200, 20, args.image_size, 0, show_progress=False)
    os.makedirs(args.output, exist_ok=True)
    results, pairs = [], [(m, w) for m in args.methods for w in args.workers]
    t0 = time.time()
    for k, (m, w) in enumerate(pairs):
        results.append({"method": m, "workers": w, "parts": _run_one(args, m, w, args.opts)})
        done = time.time() - t0
        print(f"[profile] {k + 1}/{len(pairs)} {m} workers={w}: "
              f"{results[-1]['parts']['total']:.3f} s/iter (ETA "
              f"{done / (k + 1) * (len(pairs) - k - 1) / 60:.1f} min)", flush=True)  # fmt: skip
    text = markdown(results)
    with open(os.path.join(args.output, "profile.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
