#!/usr/bin/env python
"""Time forward+backward of the feature-hint losses on FPN-shaped features (CPU by default).

Why: SSIM-KD replaces one elementwise loss with five Gaussian-filtered statistics per level, and on
CPU ``pytorch_msssim.ssim`` was measured at ~50x the cost of MSE. This script measures
``F.mse_loss``, raw ``pytorch_msssim.ssim`` and kd_det's :class:`SSIMFeatureLoss`, plus a few
alternative ways to compute the same SSIM map, and checks that every variant equals
``pytorch_msssim.ssim`` within ``--atol`` before its time is reported.

Example::

    python dev/benchmark_ssim.py --height 512 --width 640 --repeats 3

``--fused-vs-reference`` instead measures the loss alone on CUDA (:func:`fused_vs_reference`, also
callable from a GPU benchmark): MSE, the reference SSIM and the fused Triton SSIM, forward and
backward on P2-P6 of an 800x1216 batch of 8, with peak memory above the inputs, the fused-vs-
reference agreement in float32 and finiteness under fp16/bf16 autocast, beside the targets
(fused SSIM <= 10 ms and <= 2 GB). On CPU it runs at tiny size; the fused rows need
``TRITON_INTERPRET=1`` there::

    python dev/benchmark_ssim.py --fused-vs-reference --device cuda
"""

import argparse
import statistics
import time
import warnings

import pytorch_msssim
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kd_det.layers.fused_ssim import fused_unavailable_reason
from kd_det.modeling.losses.ssim import (
    SSIMFeatureLoss,
    gaussian_valid,
    gaussian_window,
    ssim_map,
)

LEVELS = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
DATA_RANGE = 6.0
K1, K2 = 0.01, 0.03


def make_features(batch, channels, height, width, seed=0):
    """Student and teacher FPN maps; P6 (stride 64) is rounded up like a stride-2 conv on P5."""
    gen = torch.Generator().manual_seed(seed)
    feats = []
    for stride in LEVELS.values():
        shape = (batch, channels, -(-height // stride), -(-width // stride))
        teacher = torch.randn(shape, generator=gen)
        student = (0.7 * teacher + 0.5 * torch.randn(shape, generator=gen)).requires_grad_()
        feats.append((student, teacher))
    return feats


# ------------------------------------------------------------------------------------------------
# Alternative SSIM-map implementations; all compute the same values as kd_det's ssim_map. They are
# the steps that led to it, kept so that the measurements can be repeated.
# ------------------------------------------------------------------------------------------------
def _conv_blur(x, win):
    """Depthwise separable valid filter with F.conv2d (pytorch_msssim's way), H then W."""
    g, k = x.shape[1], win.numel()
    x = F.conv2d(x, win.view(1, 1, k, 1).expand(g, 1, k, 1), groups=g)
    return F.conv2d(x, win.view(1, 1, 1, k).expand(g, 1, 1, k), groups=g)


def _band_blur(x, win):
    """kd_det's band-matrix filter (autograd differentiates the matrix products)."""
    return gaussian_valid(x, win.numel(), 1.5)


def _shift_blur(x, win):
    """Separable valid filter as a sum of shifted slices (no convolution kernel)."""
    k = win.numel()
    h, w = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    out = x[..., 0:h, :] * win[0]
    for i in range(1, k):
        out = out + x[..., i : i + h, :] * win[i]
    res = out[..., 0:w] * win[0]
    for i in range(1, k):
        res = res + out[..., i : i + w] * win[i]
    return res


def _ssim_from_stats(mu_x, mu_y, e_xx, e_yy, e_xy):
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    sxx, syy, sxy = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * ((2 * sxy + c2) / (sxx + syy + c2))


def map_five_blurs(x, y, win):
    """pytorch_msssim's structure: five separate depthwise convolutions, all under autograd."""
    stats = [_conv_blur(t, win) for t in (x, y, x * x, y * y, x * y)]
    return _ssim_from_stats(*stats)


def map_stacked5(x, y, win):
    """One grouped convolution over ``[x, y, x*x, y*y, x*y]`` stacked along channels."""
    c = x.shape[1]
    stats = _conv_blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), win).split(c, dim=1)
    return _ssim_from_stats(*stats)


def _split_nograd(blur):
    """``[x, x*x, x*y]`` filtered with autograd, the teacher's ``[y, y*y]`` under no_grad."""

    def fn(x, y, win):
        c = x.shape[1]
        with torch.no_grad():
            mu_y, e_yy = blur(torch.cat([y, y * y], dim=1), win).split(c, dim=1)
        mu_x, e_xx, e_xy = blur(torch.cat([x, x * x, x * y], dim=1), win).split(c, dim=1)
        return _ssim_from_stats(mu_x, mu_y, e_xx, e_yy, e_xy)

    return fn


def map_channels_last(x, y, win):
    """Split/no_grad convolutions on channels_last inputs (oneDNN's depthwise prefers NHWC)."""
    x = x.contiguous(memory_format=torch.channels_last)
    y = y.contiguous(memory_format=torch.channels_last)
    return _split_nograd(_conv_blur)(x, y, win)


def map_kd_det(x, y, win):
    """kd_det: band-matrix filters and the hand-written backward of _SSIMMap."""
    return ssim_map(x, y, DATA_RANGE, win.numel(), 1.5, (K1, K2))


VARIANTS = {
    "five_blurs": map_five_blurs,
    "stacked5": map_stacked5,
    "split_nograd": _split_nograd(_conv_blur),
    "channels_last": map_channels_last,
    "shift_add": _split_nograd(_shift_blur),
    "band_autograd": _split_nograd(_band_blur),
    "band_custom_bwd": map_kd_det,
}


def variant_loss(fn, feats, loss_module):
    total = 0.0
    for student, teacher in feats:
        size = loss_module.window_size_for(*student.shape[-2:])
        if size is None:
            continue
        total = total + (1.0 - fn(student, teacher, gaussian_window(size, 1.5))).mean()
    return total


def time_fn(name, fn, feats, repeats, warmup):
    """Median wall time of ``fn(feats).backward()`` after ``warmup`` untimed runs."""
    times = []
    for i in tqdm(range(warmup + repeats), desc=f"{name:>16s}", leave=False):
        for student, _ in feats:
            student.grad = None
        start = time.perf_counter()
        fn(feats).backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# Fused (Triton) against reference SSIM: the loss alone, forward + backward
# ------------------------------------------------------------------------------------------------
#: The fused SSIM's targets on an H200 (P2-P6 of an 800x1216 batch of 8, 256 channels, fwd + bwd).
FUSED_TARGETS = {"ms": 10.0, "peak_mb": 2048.0}


def _fpn_maps(batch, channels, height, width, device, seed=0):
    """P2-P6 ``(student, teacher)`` float32 pairs made on ``device`` (no host copy of GBs)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for stride in LEVELS.values():
        shape = (batch, channels, -(-height // stride), -(-width // stride))
        teacher = torch.randn(shape, generator=gen, device=device)
        student = teacher.mul(0.7).add_(torch.randn(shape, generator=gen, device=device), alpha=0.5)
        out.append((student.requires_grad_(), teacher))
    return out


def _time_and_memory(fn, feats, device, repeats, warmup):
    """Median ms of ``fn(feats).backward()`` and its peak CUDA memory above the inputs in MB
    (gradients included, as for every loss; ``None`` on CPU, where torch keeps no such count)."""
    cuda = torch.device(device).type == "cuda"
    times, peak = [], None
    for i in range(warmup + repeats):
        for student, _ in feats:
            student.grad = None
        if cuda:
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn(feats).backward()
        if cuda:
            torch.cuda.synchronize(device)
            peak = max(peak or 0.0, (torch.cuda.max_memory_allocated(device) - base) / 2**20)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    for student, _ in feats:
        student.grad = None
    return statistics.median(times), peak


def _rel(a, b):
    """Largest difference relative to the largest magnitude of ``b``."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _agreement(fused, reference, feats):
    """Per level: relative difference of the fused value and gradient from the reference's."""
    out = []
    for student, teacher in feats:
        pair = []
        for loss in (fused, reference):
            x = student.detach().clone().requires_grad_()
            value = loss(x, teacher)
            value.backward()
            pair.append((value.detach(), x.grad))
        out.append((_rel(pair[0][0], pair[1][0]), _rel(pair[0][1], pair[1][1])))
    return max(v for v, _ in out), max(g for _, g in out)


def _half_check(loss, feats, dtype, device):
    """Value and gradients under ``dtype`` inputs and autocast: finite, and the value's relative
    distance to the float32 value."""
    device_type = torch.device(device).type
    with torch.no_grad():
        ref = sum(loss(s, t) for s, t in feats).item()
    half = [(s.detach().to(dtype).requires_grad_(), t.to(dtype)) for s, t in feats]
    with torch.autocast(device_type=device_type, dtype=dtype):
        value = sum(loss(s, t) for s, t in half)
    value.backward()
    finite = bool(torch.isfinite(value)) and all(
        s.grad is not None and bool(torch.isfinite(s.grad).all()) for s, _ in half
    )
    return {"finite": finite, "rel_to_fp32": abs(value.item() - ref) / abs(ref)}


def fused_vs_reference(
    device="cuda",
    batch=8,
    height=800,
    width=1216,
    channels=256,
    repeats=10,
    warmup=3,
    policies=("teacher_absmax", "minmax"),
    rtol=1e-5,
    verbose=True,
):
    """Time and check the fused SSIM against the reference and MSE, on the loss alone.

    For each range policy: the reference and fused :class:`SSIMFeatureLoss` (``impl``) over P2-P6,
    forward + backward, median ms and peak memory above the inputs; the fused value and gradient
    against the reference's in float32 (``rtol``, per level); finiteness (and distance to float32)
    with float16 and bfloat16 inputs under autocast. The fused rows are skipped, with the reason,
    where the kernels cannot run (no triton; CPU without ``TRITON_INTERPRET=1``).

    Returns:
        dict: ``{"device", "shapes", "targets", "timing": {name: {"ms", "peak_mb"}},
        "checks": {policy: {...}}, "skipped": {name: reason}}``.
    """
    say = print if verbose else (lambda *a, **k: None)
    feats = _fpn_maps(batch, channels, height, width, device)
    shapes = [tuple(s.shape) for s, _ in feats]
    say(f"loss alone, fwd+bwd, P2-P6 {batch}x{channels}ch of {height}x{width} on {device}: "
        + ", ".join("x".join(map(str, s[-2:])) for s in shapes))  # fmt: skip
    reason = fused_unavailable_reason(torch.device(device))
    result = {"device": str(device), "shapes": shapes, "targets": dict(FUSED_TARGETS)}
    result.update(timing={}, checks={}, skipped={})
    losses = {"mse": lambda fs: sum(F.mse_loss(s, t) for s, t in fs)}
    for policy in policies:
        modules = {"reference": SSIMFeatureLoss(range_policy=policy, impl="reference")}
        if reason is None:
            modules["fused"] = SSIMFeatureLoss(range_policy=policy, impl="fused")
        else:
            result["skipped"][f"ssim fused {policy}"] = reason
        for impl, module in modules.items():
            losses[f"ssim {impl} {policy}"] = lambda fs, m=module: sum(m(s, t) for s, t in fs)
        checks = {}
        if "fused" in modules:
            value_err, grad_err = _agreement(modules["fused"], modules["reference"], feats)
            checks["fp32"] = {"value_rel": value_err, "grad_rel": grad_err}
            checks["fp32"]["ok"] = value_err <= rtol and grad_err <= rtol
        for dtype in (torch.float16, torch.bfloat16):
            for impl, module in modules.items():
                checks[f"{impl} {dtype}"] = _half_check(module, feats, dtype, device)
        result["checks"][policy] = checks
    for name, fn in losses.items():
        ms, peak = _time_and_memory(fn, feats, device, repeats, warmup)
        result["timing"][name] = {"ms": ms, "peak_mb": peak}

    say(f"{'loss':>28s} {'ms':>9s} {'peak MB':>9s}  target")
    for name, row in result["timing"].items():
        peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
        target = ""
        if name.startswith("ssim fused"):
            t = FUSED_TARGETS
            ok = row["ms"] <= t["ms"] and (row["peak_mb"] or 0.0) <= t["peak_mb"]
            target = f"<= {t['ms']:.0f} ms, <= {t['peak_mb']:.0f} MB: {'met' if ok else 'NOT met'}"
            if torch.device(device).type != "cuda":
                target = f"<= {t['ms']:.0f} ms, <= {t['peak_mb']:.0f} MB (an H200 target)"
        say(f"{name:>28s} {row['ms']:9.2f} {peak:>9s}  {target}")
    for name, why in result["skipped"].items():
        say(f"{name:>28s}  skipped: {why}")
    for policy, checks in result["checks"].items():
        for name, check in checks.items():
            say(f"check {policy} {name}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float)
                else f"{k}={v}" for k, v in check.items()))  # fmt: skip
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=None, help="image height (512; 800 fused)")
    parser.add_argument("--width", type=int, default=None, help="image width (640; 1216 fused)")
    parser.add_argument("--channels", type=int, default=256, help="FPN channels")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (2; 8 fused)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per loss")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per loss")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--atol", type=float, default=1e-5, help="tolerance vs pytorch_msssim")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated SSIM-map variants"
    )
    parser.add_argument(
        "--fused-vs-reference",
        action="store_true",
        help="time MSE, reference and fused SSIM (the loss alone) instead: fused_vs_reference()",
    )
    parser.add_argument("--device", default="cuda", help="device of --fused-vs-reference")
    parser.add_argument("--output", default="", help="--fused-vs-reference: also write JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fused_vs_reference:
        result = fused_vs_reference(
            args.device, args.batch or 8, args.height or 800, args.width or 1216, args.channels,
            args.repeats, args.warmup,
        )  # fmt: skip
        if args.output:
            import json

            with open(args.output, "w") as f:
                json.dump(result, f, indent=1, default=str)
        bad = [p for p, c in result["checks"].items() if not c.get("fp32", {}).get("ok", True)]
        bad += [f"{p} {n}" for p, c in result["checks"].items() for n, v in c.items()
                if "finite" in v and not v["finite"]]  # fmt: skip
        if bad:
            raise SystemExit(f"fused SSIM checks failed: {bad}")
        return
    args.height, args.width, args.batch = args.height or 512, args.width or 640, args.batch or 2
    warnings.filterwarnings("ignore", message="Skipping Gaussian Smoothing")

    feats = make_features(args.batch, args.channels, args.height, args.width)
    shapes = ", ".join("x".join(map(str, s.shape[-2:])) for s, _ in feats)
    print(f"{args.batch}x{args.channels}ch levels {shapes}; threads={torch.get_num_threads()}")
    loss_module = SSIMFeatureLoss(range_policy="none", data_range=DATA_RANGE)
    default_module = SSIMFeatureLoss()

    def ref_ssim(fs):
        # Raw pytorch_msssim with kd_det's window choice per level (the window is shrunk for maps
        # smaller than 11, as SSIMFeatureLoss does, so that the values are comparable).
        total = 0.0
        for s, t in fs:
            size = loss_module.window_size_for(*s.shape[-2:])
            if size is not None:
                total = (
                    total + 1.0 - pytorch_msssim.ssim(s, t, data_range=DATA_RANGE, win_size=size)
                )
        return total

    losses = {
        "mse": lambda fs: sum(F.mse_loss(s, t) for s, t in fs),
        "pytorch_msssim": ref_ssim,
        "kd_det ssim": lambda fs: sum(loss_module(s, t) for s, t in fs),
        "kd_det default": lambda fs: sum(default_module(s, t) for s, t in fs),
    }
    for name in filter(None, args.variants.split(",")):
        losses[f"v:{name}"] = lambda fs, fn=VARIANTS[name]: variant_loss(fn, fs, loss_module)

    with torch.no_grad():
        reference = ref_ssim(feats).item()
    results = {}
    for name, fn in losses.items():
        if name not in ("mse", "pytorch_msssim", "kd_det default"):
            with torch.no_grad():
                err = abs(fn(feats).item() - reference)
            if err > args.atol:
                print(f"{name}: differs from pytorch_msssim by {err:.2e} > {args.atol}; skipped")
                continue
        results[name] = time_fn(name, fn, feats, args.repeats, args.warmup)

    print(f"{'loss':>16s} {'median s':>9s} {'x mse':>7s} {'x msssim':>8s}")
    for name, sec in results.items():
        print(
            f"{name:>16s} {sec:9.3f} {sec / results['mse']:7.1f} "
            f"{sec / results['pytorch_msssim']:8.2f}"
        )


if __name__ == "__main__":
    main()
