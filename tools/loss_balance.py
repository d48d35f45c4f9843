#!/usr/bin/env python
"""How large the distillation terms are next to the detection losses, over a run's schedule.

A distillation weight is only meaningful relative to the detection losses it is added to: the
same ``MODEL.KD.FEATURE.WEIGHTS`` gives a term that dominates on one dataset and vanishes on
another. The method study tuned each weight on its own data, so what carries over to yours is the
*balance* the tuned weight produced, not the number. This tool reads detectron2's ``metrics.json``
of one or more runs and prints, for the start, middle and end of training, the ratio

    (sum of the ``loss_kd_*`` terms) / (sum of the detection ``loss_*`` terms)

(the meta-weight network's ``loss_hint_meta`` counts as neither: it trains no detector)

plus the largest distillation term at the end. Compare your run's ratio after the first few
dozen iterations with the study's tuned runs and scale your weight until they are close.

    python tools/loss_balance.py output/my_distill_run       # one or more run directories
    python tools/loss_balance.py --study projects/MethodStudy/results      # every dev trial

Rows that have no loss (evaluation and teacher-check entries) are skipped; a window is the first,
middle and last ``--window`` fraction of the logged training rows.
"""

import argparse
import os
import sys

from kd_det.utils.loss_balance import study_runs, table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run directories (each with a metrics.json)")
    p.add_argument("--study", help="a method-study output directory: every dev trial")
    p.add_argument("--window", type=float, default=0.1, help="fraction of rows per window")
    args = p.parse_args(argv)
    if not args.runs and not args.study:
        p.error("give run directories or --study DIR")
    if not 0 < args.window <= 1 / 3:
        p.error(f"--window must be in (0, 1/3], got {args.window}: the three windows overlap.")
    return args


def main(argv=None):
    args = parse_args(argv)
    labelled = [(os.path.relpath(r), r) for r in args.runs]
    for _, r in labelled:
        if not os.path.exists(os.path.join(r, "metrics.json")):
            sys.exit(f"{r} has no metrics.json: give the OUTPUT_DIR of a tools/train_net.py run.")
    if args.study:
        found = study_runs(args.study)
        if not found:
            sys.exit(f"{args.study} has no runs/dev/*/*/seed0: give a method study's --output.")
        labelled += found
    print(table(labelled, args.window), end="")


if __name__ == "__main__":
    main()
