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


def main(argv=None):
    args = build_parser().parse_args(argv)
    from detectron2.data.detection_utils import read_image

    from kd_det.export.deploy import export_onnx, export_torchscript

    image = read_image(args.image, format="BGR")
    export = export_onnx if args.format == "onnx" else export_torchscript
    try:
        res = export(
            os.path.join(args.export_dir, "config.yaml"),
            os.path.join(args.export_dir, "model_final.pth"),
            args.output or args.export_dir,
            image,
            args.atol,
        )
    except RuntimeError as e:
        raise SystemExit(str(e))
    print(f"Wrote {res['path']} (traced at {res['input_size'][0]}x{res['input_size'][1]})")
    print(json.dumps(res["checks"], indent=2))
    return res


if __name__ == "__main__":
    main()
