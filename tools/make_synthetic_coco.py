#!/usr/bin/env python
"""Generate kd_det's synthetic-shapes detection dataset in COCO format.

Example::

    python tools/make_synthetic_coco.py --output datasets/synthetic --num-train 2000 \\
        --num-val 300 --image-size 192 --seed 0

Writes ``OUTPUT/{train,val}.json``, images under ``OUTPUT/{train,val}/`` and ``OUTPUT/meta.json``.
Re-running with the same parameters is a fast no-op (see
:func:`kd_det.data.synthetic.generate_dataset`); ``--force`` regenerates anyway.
"""

import argparse
import os
import sys

import kd_det.data.synthetic as synthetic


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="dataset root directory")
    parser.add_argument("--num-train", type=int, default=synthetic.DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=synthetic.DEFAULT_NUM_VAL)
    parser.add_argument("--num-test", type=int, default=0, help="test split (0: none)")
    parser.add_argument("--image-size", type=int, default=synthetic.DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=synthetic.DEFAULT_SEED)
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if matching data already exists"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def format_summary(result):
    """Render the per-split image/annotation counts and per-class counts as a text table."""
    lines = [f"Synthetic COCO dataset at {result['root']}"]
    splits = tuple(s for s in ("train", "val", "test") if s in result)
    for split in splits:
        s = result[split]
        lines.append(
            f"  {split:5s}: {s['images']:6d} images, {s['annotations']:7d} annotations "
            f"({s['annotations'] / max(s['images'], 1):.1f}/image) -> {result[split + '_json']}"
        )
    width = max(len(n) for n in synthetic.CLASS_NAMES)
    lines.append(f"  {'class':{width}s} " + " ".join(f"{s:>7s}" for s in splits))
    for name in synthetic.CLASS_NAMES:
        counts = " ".join(f"{result[s]['per_class'].get(name, 0):7d}" for s in splits)
        lines.append(f"  {name:{width}s} {counts}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.force:
        meta = os.path.join(args.output, "meta.json")
        if os.path.exists(meta):
            os.remove(meta)  # generate_dataset then sees no complete dataset and regenerates
    result = synthetic.generate_dataset(
        args.output,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size,
        seed=args.seed,
        show_progress=not args.quiet,
        num_test=args.num_test,
    )
    if result["skipped"] and args.quiet:
        print("Matching data already present; skipped generation (use --force to regenerate).")
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
