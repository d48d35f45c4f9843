"""Write a COCO-format detection dataset made by third-party PyPI packages, not by kd_det.

Example::

    python -m method_study.make_external_coco --output datasets/animal_scenes

kd_det's method study runs on scenes from its own generator (``kd_det/data/synthetic_scene.py``).
A result that holds only there could come from something that generator happens to do. This tool
makes a second dataset whose every part comes from elsewhere, so the study can be repeated on it
through ``DATASETS.COCO`` with no kd_det code in the data path: the scenes come from the
``mnist-detection`` generator and the objects from ``animal-shape-mnist``'s silhouettes
(:mod:`method_study.external_sources` describes both and why they count as an independent source).

What this tool adds, and why:

* **Disjoint silhouettes per split.** Each class's 1,000 silhouettes are split once (a fixed
  permutation, the same for every ``--seed``) into 70 % for train and 15 % each for val and test,
  so val and test measure detection of animals never seen in training.
* **Determinism.** The package draws from NumPy's global random state. Each image seeds it from
  ``(seed, split, index)``, and the caller's state is restored afterwards, so an image does not
  depend on the split sizes and the same seed writes byte-identical files.
* **No hidden objects.** The package pastes objects in order without checking overlap, so a later
  object can cover an earlier one while the earlier box stays annotated. A scene in which any box
  is covered for more than ``--max-covered`` of its area by later boxes is drawn again (at most
  ``MAX_TRIES`` times; after that the covered boxes are dropped and counted).
* **Valid boxes.** Boxes are clipped to the image and dropped if they have no area; both are
  counted and printed, so a change in the package shows up.
* **Skipping.** ``meta.json`` holds the parameters and package versions and is written last; a
  run whose parameters match a complete dataset does nothing (``--force`` regenerates).

Output::

    OUTPUT/train.json OUTPUT/train/000000.png ...   (also val and test)
    OUTPUT/meta.json

Categories have ids 1..10 in the order above; ``bbox`` is ``[x, y, w, h]`` in pixels, with
``area`` (the box area) and ``iscrowd`` 0. Images are PNG: lossless, so the soft object edges
are not blurred further by JPEG. The packages are the study's optional extra:
``pip install -e "projects/MethodStudy[external]"``.
"""

import argparse
import json
import os
import shutil
import sys
import warnings

from .external_sources import (
    CLASS_NAMES,
    PACKAGES,
    MissingPackageError,
    load_silhouettes,
    package_versions,
    require,
)

SPLITS = ("train", "val", "test")
#: Share of each class's silhouettes reserved for train and val; test gets the rest.
POOL_FRACTIONS = (0.70, 0.15)
POOL_SEED = 20240601
#: Objects per scene: Poisson with this mean (as the package's own dataset class draws them),
#: clipped to [1, MAX_OBJECTS].
MEAN_OBJECTS = 3.0
MAX_OBJECTS = 6
MAX_TRIES = 50
#: Bumped whenever the output for the same parameters changes.
FORMAT_VERSION = 1
DEFAULT_NAME = "animal_scenes"


def split_pools(labels):
    """Indices of the silhouettes each split draws from: per class, a fixed permutation cut into
    train / val / test (see ``POOL_FRACTIONS``), disjoint so val and test show unseen animals."""
    import numpy as np

    rng = np.random.default_rng(POOL_SEED)
    pools = {s: [] for s in SPLITS}
    for c in range(len(CLASS_NAMES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(len(idx) * POOL_FRACTIONS[0]))
        n_val = int(round(len(idx) * POOL_FRACTIONS[1]))
        pools["train"].append(idx[:n_train])
        pools["val"].append(idx[n_train : n_train + n_val])
        pools["test"].append(idx[n_train + n_val :])
    return {s: np.sort(np.concatenate(v)) for s, v in pools.items()}


class _Objects:
    """The ``Sequence[(PIL.Image, label)]`` the package's generator samples objects from."""

    def __init__(self, images, labels, indices):
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from PIL import Image

        j = self.indices[i]
        return Image.fromarray(self.images[j], mode="L"), int(self.labels[j])


def simulator_config(image_size):
    """The package's default config scaled from its 256 px canvas to ``image_size``.

    Objects are 1/8 to 3/8 of the image side (the package steps sizes by 8 px), top-left corners
    keep a margin of 1/5 of the side on the right and bottom (objects there are cut by the image
    border), and the rotation, colours and blur stay the package's defaults.
    """
    simulator = require("mnist-detection").simulator
    from omegaconf import OmegaConf

    min_size = max(8, image_size // 8)
    overrides = {
        "canvas": [image_size, image_size],
        "margin": [image_size // 5, image_size // 5],
        "stride": [max(1, image_size // 32)] * 2,
        "min_size": min_size,
        "max_size": max(min_size, image_size * 3 // 8),
    }
    return OmegaConf.merge(simulator.DEFAULT_CONFIG, overrides)


def covered_fractions(boxes, image_size):
    """For each box, the share of its area that boxes pasted after it cover (their union)."""
    import numpy as np

    out = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        area = (x1 - x0) * (y1 - y0)
        if area <= 0:
            out.append(1.0)
            continue
        later = np.zeros((image_size, image_size), dtype=bool)
        for a0, b0, a1, b1 in boxes[i + 1 :]:
            later[b0:b1, a0:a1] = True
        out.append(float(later[y0:y1, x0:x1].sum()) / area)
    return out


def clean_boxes(raw_boxes, image_size, stats):
    """Integer ``[x0, y0, x1, y1]`` boxes clipped to the image; ``None`` for a box with no area.

    ``stats`` counts ``clipped`` and ``dropped_invalid`` boxes.
    """
    import math

    out = []
    for box in raw_boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            stats["dropped_invalid"] += 1
            out.append(None)
            continue
        c = [int(round(min(max(v, 0.0), image_size))) for v in (x0, y0, x1, y1)]
        if c != [x0, y0, x1, y1]:
            stats["clipped"] += 1
        if c[2] - c[0] < 1 or c[3] - c[1] < 1:
            stats["dropped_invalid"] += 1
            out.append(None)
            continue
        out.append(c)
    return out


def render_scene(objects, config, image_size, seed, split, index, max_covered, stats):
    """One scene from the package's generator, drawn again while an object is hidden.

    Returns:
        tuple(PIL.Image, list, list): the RGB image, ``[x0, y0, x1, y1]`` boxes and labels 0..9.
    """
    import numpy as np

    # The generator reaches PIL.ImageEnhance/ImageOps/ImageFilter as attributes of PIL, which
    # exist only once something imported them.
    import PIL.ImageEnhance  # noqa: F401
    import PIL.ImageFilter  # noqa: F401
    import PIL.ImageOps  # noqa: F401

    generate = require("mnist-detection").simulator.generate_detection_image_with_annotation
    state = np.random.get_state()
    entropy = [seed, SPLITS.index(split), index]
    np.random.seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    try:
        for attempt in range(MAX_TRIES):
            num = int(np.clip(np.random.poisson(MEAN_OBJECTS), 1, MAX_OBJECTS))
            image, raw_boxes, raw_labels = generate(objects, num, config)
            boxes = clean_boxes(raw_boxes, image_size, stats)
            kept = [(b, int(lab)) for b, lab in zip(boxes, raw_labels) if b is not None]
            covered = covered_fractions([b for b, _ in kept], image_size)
            if max(covered, default=0.0) <= max_covered:
                break
            stats["redrawn"] += 1
        else:  # the last try stands, without its hidden objects
            stats["dropped_covered"] += sum(f > max_covered for f in covered)
            kept = [k for k, f in zip(kept, covered) if f <= max_covered]
    finally:
        np.random.set_state(state)
    return image.convert("RGB"), [b for b, _ in kept], [lab for _, lab in kept]


def _write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def write_split(output, split, num_images, image_size, seed, max_covered, data, show_progress):
    """Render ``num_images`` scenes into ``output/<split>/`` and write ``output/<split>.json``.

    Returns:
        dict: counts for the summary (images, annotations, per class, box fixes).
    """
    from tqdm import tqdm

    images, labels, pools = data
    objects = _Objects(images, labels, pools[split])
    config = simulator_config(image_size)
    image_dir = os.path.join(output, split)
    if os.path.isdir(image_dir):
        shutil.rmtree(image_dir)
    os.makedirs(image_dir)
    stats = {"clipped": 0, "dropped_invalid": 0, "redrawn": 0, "dropped_covered": 0}
    coco_images, annotations = [], []
    for i in tqdm(range(num_images), desc=split, unit="img", disable=not show_progress):
        image, boxes, box_labels = render_scene(
            objects, config, image_size, seed, split, i, max_covered, stats
        )
        file_name = f"{i:06d}.png"
        image.save(os.path.join(image_dir, file_name))
        coco_images.append(
            {"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for (x0, y0, x1, y1), lab in zip(boxes, box_labels):
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": lab + 1,
                    "bbox": [x0, y0, w, h],
                    "area": float(w * h),
                    "iscrowd": 0,
                }
            )
    versions = package_versions()
    coco = {
        "info": {
            "description": f"animal silhouette scenes ({split}), by tools/make_external_coco.py",
            "packages": versions,
            "seed": seed,
        },
        "images": coco_images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": n, "supercategory": "animal"} for k, n in enumerate(CLASS_NAMES)
        ],
    }
    _write_json_atomic(os.path.join(output, f"{split}.json"), coco)
    per_class = {n: 0 for n in CLASS_NAMES}
    for a in annotations:
        per_class[CLASS_NAMES[a["category_id"] - 1]] += 1
    return dict(stats, images=len(coco_images), annotations=len(annotations), per_class=per_class)


def meta_params(sizes, image_size, seed, max_covered):
    """What ``meta.json`` records; equal dicts mean equal output."""
    return {
        "format_version": FORMAT_VERSION,
        "sizes": {s: int(n) for s, n in zip(SPLITS, sizes)},
        "image_size": int(image_size),
        "seed": int(seed),
        "max_covered": float(max_covered),
        "packages": package_versions(),
    }


def is_complete(output, params):
    """True if ``meta.json`` matches ``params`` and every json and image it lists exists."""
    try:
        with open(os.path.join(output, "meta.json")) as f:
            if json.load(f)["params"] != params:
                return False
        for split in SPLITS:
            with open(os.path.join(output, f"{split}.json")) as f:
                names = [im["file_name"] for im in json.load(f)["images"]]
            if len(names) != params["sizes"][split]:
                return False
            if not all(os.path.isfile(os.path.join(output, split, n)) for n in names):
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def generate(
    output,
    num_train=400,
    num_val=300,
    num_test=300,
    image_size=128,
    seed=0,
    max_covered=0.5,
    force=False,
    show_progress=True,
):
    """Write the three splits and ``meta.json`` under ``output`` unless they already match.

    Returns:
        dict: ``skipped`` and, for a fresh run, per-split counts (see :func:`write_split`).
    """
    if image_size < 32:
        raise ValueError(f"--image-size {image_size} is too small; use 32 or more")
    if min(num_train, num_val, num_test) < 1:
        raise ValueError("every split needs at least one image")
    for pip_name in PACKAGES:  # fail before touching the output directory
        require(pip_name)
    for pip_name, installed in package_versions().items():
        if installed != PACKAGES[pip_name][0]:
            warnings.warn(
                f"{pip_name} {installed} is installed; this tool was checked with "
                f"{PACKAGES[pip_name][0]}, so scenes may differ from datasets made elsewhere"
            )
    params = meta_params((num_train, num_val, num_test), image_size, seed, max_covered)
    meta_path = os.path.join(output, "meta.json")
    if not force and is_complete(output, params):
        with open(meta_path) as f:
            return dict(json.load(f)["summary"], skipped=True)
    os.makedirs(output, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # an interrupted run must never look complete
    images, labels = load_silhouettes()
    data = (images, labels, split_pools(labels))
    summary = {}
    for split, n in zip(SPLITS, (num_train, num_val, num_test)):
        summary[split] = write_split(
            output, split, n, image_size, seed, max_covered, data, show_progress
        )
    _write_json_atomic(meta_path, {"params": params, "summary": summary})
    return dict(summary, skipped=False)


def overrides(output, name=DEFAULT_NAME):
    """The ``tools/train_net.py`` overrides that train on the dataset and evaluate on val."""
    entries = [[f"{name}_{s}", os.path.join(output, f"{s}.json"), os.path.join(output, s)]
               for s in SPLITS]  # fmt: skip
    return [
        "DATASETS.COCO", json.dumps(entries),
        "DATASETS.TRAIN", f"('{name}_train',)",
        "DATASETS.TEST", f"('{name}_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(CLASS_NAMES)),
    ]  # fmt: skip


def command_line(opts):
    """``KEY VALUE`` pairs quoted for a POSIX shell, as the docs write them."""
    import shlex

    words = []
    for key, value in zip(opts[0::2], opts[1::2]):
        quoted = f'"{value}"' if value.startswith("(") else shlex.quote(value)
        words.append(f"{key} {quoted}")
    return " ".join(words)


def format_summary(output, result):
    """Per-split counts, box fixes and per-class counts as text."""
    done = " (already there, nothing written)" if result["skipped"] else ""
    lines = [f"Animal-scene COCO dataset at {output}{done}"]
    for split in SPLITS:
        s = result[split]
        lines.append(
            f"  {split:5s}: {s['images']:5d} images, {s['annotations']:6d} boxes "
            f"({s['annotations'] / max(s['images'], 1):.1f}/image); boxes clipped "
            f"{s['clipped']}, dropped invalid {s['dropped_invalid']}; scenes redrawn for "
            f"hidden objects {s['redrawn']}, hidden boxes dropped {s['dropped_covered']}"
        )
    counts = [
        f"{n} " + "/".join(str(result[s]["per_class"][n]) for s in SPLITS) for n in CLASS_NAMES
    ]
    lines.append("  boxes per class (train/val/test): " + ", ".join(counts))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="dataset root directory")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=300, help="dev split")
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=128, help="square images, pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-covered",
        type=float,
        default=0.5,
        help="redraw a scene if a box is covered for more than this share by later objects",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="dataset name prefix to print")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        result = generate(
            args.output,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            image_size=args.image_size,
            seed=args.seed,
            max_covered=args.max_covered,
            force=args.force,
            show_progress=not args.quiet,
        )
    except (MissingPackageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(args.output, result))
    print("\nTrain on it: add these overrides to tools/train_net.py (evaluates on val):")
    print(command_line(overrides(args.output, args.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
