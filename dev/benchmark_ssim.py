#!/usr/bin/env python
"""Time forward+backward of the feature-hint losses on FPN-shaped features (CPU by default).

Why: SSIM-KD replaces one elementwise loss with five Gaussian-filtered statistics per level, and on
CPU ``pytorch_msssim.ssim`` was measured at ~50x the cost of MSE. This script measures
``F.mse_loss``, raw ``pytorch_msssim.ssim`` and kd_det's :class:`SSIMFeatureLoss`, plus a few
alternative ways to compute the same SSIM map, and checks that every variant equals
``pytorch_msssim.ssim`` within ``--atol`` before its time is reported.

Example::

    python dev/benchmark_ssim.py --height 512 --width 640 --repeats 3
"""

import argparse
import statistics
import time
import warnings

import pytorch_msssim
import torch
import torch.nn.functional as F
from tqdm import tqdm

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=512, help="input image height")
    parser.add_argument("--width", type=int, default=640, help="input image width")
    parser.add_argument("--channels", type=int, default=256, help="FPN channels")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per loss")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per loss")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--atol", type=float, default=1e-5, help="tolerance vs pytorch_msssim")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated SSIM-map variants"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
