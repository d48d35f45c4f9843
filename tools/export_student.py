#!/usr/bin/env python
"""Export a kd_det student as a vanilla detectron2 detector.

    python tools/export_student.py --config-file CFG --weights out/model_final.pth --output export/

writes ``export/model_final.pth`` (distillation adapters dropped) and ``export/config.yaml``
(``GeneralizedRCNN``, no kd_det keys), which detectron2's ``DefaultPredictor`` loads directly.
"""

import argparse
import sys

import kd_det  # noqa: F401  (registers kd_det's components)
from kd_det.config import ConfigFileError, get_kd_cfg
from kd_det.export.student import ExportError, export_student


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the training config")
    parser.add_argument("--weights", required=True, help="trained checkpoint")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument(
        "--member",
        default=None,
        help="online distillation: the member to export, peer<i> or ema<i> "
        "(default: MODEL.ONLINE_KD.INFERENCE)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    cfg = get_kd_cfg()
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        out = export_student(
            cfg, args.weights, args.output, member=args.member, config_file=args.config_file
        )
    except (ExportError, ConfigFileError) as e:
        sys.exit(f"export_student.py: error: {e}")
    print(
        f"Wrote {out['weights']} and {out['config']} ({out['dropped_keys']} adapter keys dropped)"
    )
    return out


if __name__ == "__main__":
    main()
