#!/usr/bin/env python
"""Trace an exported student to TorchScript or ONNX (detectron2's TracingAdapter) and check it.

    python tools/trace_student.py --export-dir export/lite0_ssim --image input.jpg

reads ``config.yaml`` and ``model_final.pth`` written there by ``tools/export_student.py``, writes
``model.ts`` next to them (or into ``--output``) and checks that it reproduces the eager model's
boxes, scores and classes on ``--image`` and on the image at another size (exit status 1 if
not). The traced model takes one resized ``(3, H, W)`` image in the model's ``INPUT.FORMAT`` and
returns ``(boxes, classes, scores, ...)`` tensors at that resolution: see
``kd_det/export/deploy.py``. ``--format onnx`` writes ``model.onnx`` instead (dynamic height and
width) and checks it with onnxruntime the same way.
"""

import argparse
import json
import os


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export-dir", required=True, help="the --output of tools/export_student.py")
    p.add_argument("--image", required=True, help="an image to trace and check on (any size)")
    p.add_argument("--output", default="", help="directory for model.ts (default: --export-dir)")
    p.add_argument("--atol", type=float, default=1e-3, help="box (px) and score tolerance")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                   help="model.ts, or model.onnx checked with onnxruntime (pip install onnx "
                        "onnxruntime)")  # fmt: skip
    return p


def check_args(parser, args):
    """Refuse, before anything is built, what would fail later with a raw traceback."""
    for name in ("config.yaml", "model_final.pth"):
        if not os.path.isfile(os.path.join(args.export_dir, name)):
            parser.error(
                f"--export-dir '{args.export_dir}' holds no {name}; give the --output folder of "
                "tools/export_student.py."
            )
    if not os.path.isfile(args.image):
        parser.error(f"--image '{args.image}' does not exist.")
    if args.output and os.path.exists(args.output) and not os.path.isdir(args.output):
        parser.error(
            f"--output '{args.output}' exists and is not a directory; give a directory (model.ts "
            "or model.onnx is written into it; an earlier one there is replaced only by a model "
            "that passes the checks)."
        )
    if not args.atol > 0:
        parser.error(f"--atol must be > 0, got {args.atol}.")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    from detectron2.data.detection_utils import read_image

    from kd_det.checkpoint import UnsafeFileError, WeightsMismatchError
    from kd_det.config import ConfigFileError
    from kd_det.export.deploy import export_onnx, export_torchscript

    try:
        image = read_image(args.image, format="BGR")
    except Exception as e:
        parser.error(f"--image '{args.image}' cannot be read as an image ({type(e).__name__}: {e})")
    export = export_onnx if args.format == "onnx" else export_torchscript
    try:
        res = export(
            os.path.join(args.export_dir, "config.yaml"),
            os.path.join(args.export_dir, "model_final.pth"),
            args.output or args.export_dir,
            image,
            args.atol,
        )
    except (RuntimeError, ValueError, UnsafeFileError, WeightsMismatchError, ConfigFileError) as e:
        raise SystemExit(f"trace_student.py: error: {e}")
    print(f"Wrote {res['path']} (traced at {res['input_size'][0]}x{res['input_size'][1]})")
    print(json.dumps(res["checks"], indent=2))
    return res


if __name__ == "__main__":
    main()
