"""What a trained student's hints look like to SSIM: its three terms, level by level.

The SSIM diagnosis (:mod:`method_study.ssim_diagnosis`) measures dev AP; this probe opens the
trained models to say *why*. For each finished distillation run it loads the student (with its
1x1 adapters) and the teacher, runs both backbones on dev images, maps each level through the run's
range policy, and reports, over every SSIM window (the run's window, shrunk as in training):

* the mean **luminance** ``l``, **contrast** ``c`` and **structure** ``s`` terms and SSIM
  ``l c s`` (Wang et al. 2004, with ``C3 = C2 / 2``);
* the median local standard deviation of the student's and the teacher's normalized maps;
* the share of windows where ``sigma_s sigma_t < C3``, where the structure term is close to 1
  whatever the two maps look like (a flat student window scores ``s = 1``).

Needs the runs' weights (``runs/``, not committed; the diagnosis retrains a run whose weights are
gone). Writes a Markdown table (``--output``) and prints it::

    python -m method_study.ssim_probe --runs tuned structure --images 32
"""

import argparse
import os

from . import RESULTS

LEVELS = ("p2", "p3", "p4", "p5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--diagnosis", default=os.path.join(RESULTS, "ssim_diagnosis"),
                   help="the diagnosis's output (runs/dev/<variant>/seed0)")  # fmt: skip
    p.add_argument("--runs", nargs="+", required=True,
                   help="variant names (runs/dev/<name>/seed0) or run directories")  # fmt: skip
    p.add_argument("--images", type=int, default=32, help="dev images probed")
    p.add_argument("--output", default=None, help="Markdown file to write")
    return p.parse_args(argv)


def load(run_dir):
    """The run's DistillationRCNN with its final weights, its config and a dev-image loader."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model

    import kd_det  # noqa: F401  (registers the meta-architecture and losses)
    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config

    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(run_dir, "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    register_datasets_from_config(cfg)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    model.eval()
    return model, cfg, build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])


def terms(s, t, loss):
    """Per-window ``l, c, s``, the two local stds and the window used, for normalized maps."""
    import torch

    from kd_det.layers.ssim_filter import gaussian_valid

    size = loss.window_size_for(*s.shape[-2:])
    if size is None:
        return None
    c = s.shape[1]
    stats = gaussian_valid(torch.cat([s, t, s * s, t * t, s * t], 1), size, loss.win_sigma)
    mx, my, exx, eyy, exy = stats.split(c, 1)
    vx, vy = (exx - mx * mx).clamp_min(0), (eyy - my * my).clamp_min(0)
    sx, sy = vx.sqrt(), vy.sqrt()
    c1 = (loss.K[0] * loss.data_range) ** 2
    c2 = (loss.K[1] * loss.data_range) ** 2
    c3 = c2 / 2
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    con = (2 * sx * sy + c2) / (vx + vy + c2)
    struct = (exy - mx * my + c3) / (sx * sy + c3)
    return {"l": lum, "c": con, "s": struct, "sx": sx, "sy": sy, "c3": c3, "window": size}


def probe(run_dir, images):
    """``{level: {"l", "c", "s", "ssim", "std_student", "std_teacher", "flat_share",
    "window"}}`` over ``images`` dev images."""
    import torch

    from kd_det.modeling.losses import SSIMFeatureLoss, normalize_pair

    model, cfg, loader = load(run_dir)
    loss = model.feature_loss
    if not isinstance(loss, SSIMFeatureLoss):  # e.g. PKD + SSIM: its SSIM part
        parts = [p for p in getattr(loss, "parts", []) if isinstance(p, SSIMFeatureLoss)]
        loss = parts[0] if parts else SSIMFeatureLoss(win_size=7, range_policy="minmax")
    acc = {lvl: {k: [] for k in ("l", "c", "s", "ssim", "sx", "sy", "flat")} for lvl in LEVELS}
    windows, seen = {}, 0
    with torch.no_grad():
        for batch in loader:
            images_s = model.preprocess_image(batch)
            s_feats = model.backbone(images_s.tensor)
            teacher = model.teacher
            t_in = teacher.preprocess_image(model._teacher_inputs(batch))
            t_feats = teacher.backbone(t_in.tensor)
            for lvl in LEVELS:
                if lvl not in model.fpn_levels:  # the run's distilled levels only
                    continue
                s = s_feats[lvl].float()
                if f"fpn_{lvl}" in model.kd_adapters:
                    s = model.kd_adapters[f"fpn_{lvl}"](s)
                s_n, t_n, _ = normalize_pair(s, t_feats[lvl].float(), loss.range_policy, loss.eps)
                r = terms(s_n, t_n, loss)
                if r is None:
                    continue
                windows[lvl] = r["window"]
                a = acc[lvl]
                for k in ("l", "c", "s", "sx", "sy"):
                    a[k].append(r[k].flatten())
                a["ssim"].append((r["l"] * r["c"] * r["s"]).flatten())
                a["flat"].append((r["sx"] * r["sy"] < r["c3"]).float().flatten())
            seen += len(batch)
            if seen >= images:
                break
    out = {}
    for lvl, a in acc.items():
        if not a["l"]:
            continue
        cat = {k: torch.cat(v) for k, v in a.items()}
        out[lvl] = {"l": cat["l"].mean().item(), "c": cat["c"].mean().item(),
                    "s": cat["s"].mean().item(), "ssim": cat["ssim"].mean().item(),
                    "std_student": cat["sx"].median().item(),
                    "std_teacher": cat["sy"].median().item(),
                    "flat_share": cat["flat"].mean().item(), "window": windows[lvl]}  # fmt: skip
    return out


def markdown(results, images):
    lines = [f"SSIM terms of trained students against the teacher, {images} dev images, every "
             "window of the run's own window size and range policy (`python -m "
             "method_study.ssim_probe`).", "",
             "| run | level | window | luminance | contrast | structure | SSIM | median local std "
             "student / teacher | windows with s_s s_t < C3 |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, levels in results.items():
        for lvl, r in levels.items():
            lines.append(
                f"| `{name}` | {lvl} | {r['window']} | {r['l']:.3f} | {r['c']:.3f} | "
                f"{r['s']:.3f} | {r['ssim']:.3f} | {r['std_student']:.4f} / "
                f"{r['std_teacher']:.4f} | {r['flat_share']:.0%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name in args.runs:
        run_dir = name if os.path.isdir(name) else os.path.join(
            args.diagnosis, "runs", "dev", name, "seed0")  # fmt: skip
        results[os.path.basename(name.rstrip("/"))] = probe(run_dir, args.images)
    md = markdown(results, args.images)
    if args.output:
        with open(args.output, "w") as f:
            f.write(md)
    print(md)
    return results


if __name__ == "__main__":
    main()
