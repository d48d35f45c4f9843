#!/usr/bin/env python
"""Plot the hint-dynamic weights of a training run (``MODEL.KD.HINT_WEIGHTING: "dynamic"``).

Reads detectron2's ``metrics.json`` (one JSON object per line, written by ``JSONWriter``) and draws,
for every hint, the mean weight over the batch's images with a band of +-1 std across images
(``hint_weight/<hint>/mean`` and ``.../std``), and in a second panel the hint's gradient agreement
with the detection loss (``hint_agreement/<hint>``) when the run logged it. Writes a PNG.

    python tools/plot_hint_weights.py --metrics output/run/metrics.json --output weights.png
"""

import argparse
import collections
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, help="a run's metrics.json")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title (default: the run directory)")
    return parser.parse_args(argv)


def load_hint_series(path):
    """``{hint: {"mean": [(iter, v)], "std": [...], "agreement": [...]}}`` from a metrics.json.

    Lines that are not JSON (a run killed while writing) are skipped; a resumed run that rewrote
    some iterations keeps the last value written for each iteration.
    """
    series = collections.defaultdict(lambda: collections.defaultdict(dict))
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            it = row.get("iteration")
            if it is None:
                continue
            for key, value in row.items():
                if key.startswith("hint_weight/"):
                    parts = key.split("/")
                    if len(parts) == 3 and parts[2] in ("mean", "std"):
                        series[parts[1]][parts[2]][it] = value
                elif key.startswith("hint_agreement/"):
                    series[key.split("/", 1)[1]]["agreement"][it] = value
    return {
        hint: {kind: sorted(points.items()) for kind, points in kinds.items()}
        for hint, kinds in series.items()
    }


def plot(series, output, title=None):
    """Draw the weights (and agreements, if any) of ``series`` into ``output``."""
    has_agreement = any(s.get("agreement") for s in series.values())
    rows = 2 if has_agreement else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 3.6 * rows), sharex=True, squeeze=False)
    ax = axes[0, 0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, hint in enumerate(sorted(series)):
        color = colors[i % len(colors)]
        mean = series[hint].get("mean", [])
        if not mean:
            continue
        its = [p[0] for p in mean]
        m = [p[1] for p in mean]
        ax.plot(its, m, color=color, label=hint, lw=1.5)
        std = dict(series[hint].get("std", []))
        if std:
            s = [std.get(it, 0.0) for it in its]
            lo = [a - b for a, b in zip(m, s)]
            hi = [a + b for a, b in zip(m, s)]
            ax.fill_between(its, lo, hi, color=color, alpha=0.15, lw=0)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("weight (mean +- std over images)")
    ax.legend(fontsize=8, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    if has_agreement:
        ax2 = axes[1, 0]
        for i, hint in enumerate(sorted(series)):
            agree = series[hint].get("agreement", [])
            if agree:
                ax2.plot(*zip(*agree), color=colors[i % len(colors)], label=hint, lw=1.2)
        ax2.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax2.set_ylabel("cos(hint grad, detection grad)")
        ax2.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    fig.suptitle(title or "hint-dynamic weights")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    series = load_hint_series(args.metrics)
    if not series:
        print(
            f"No hint_weight/* scalars in {args.metrics}: was the run trained with "
            "MODEL.KD.HINT_WEIGHTING dynamic?",
            file=sys.stderr,
        )
        return 1
    title = args.title or os.path.basename(os.path.dirname(os.path.abspath(args.metrics)))
    plot(series, args.output, title)
    print(f"Wrote {args.output} ({len(series)} hints).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
