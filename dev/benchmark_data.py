#!/usr/bin/env python
"""Throughput of the plain DatasetMapper vs. MixedSampleDatasetMapper for every mix type.

All mappers run in one process, one after another, on the same small dataset written into a
temporary directory (generated scenes from ``kd_det.data.synthetic``, or skimage photos as JPEG with
random boxes), with the same augmentation config and the same global numpy seed. Mixing is applied
to every sample (``--prob 1``) unless told otherwise, so the numbers are the worst case; at
probability ``p`` the expected ratio is ``1 / ((1 - p) + p / ratio)``.

Each mix type is measured with fresh partners (every partner read, decoded and augmented) and with
the partner cache (``partner_cache_size``, partners reused from recently mapped samples).

With ``--workers N`` every mapper instead feeds a ``torch.utils.data.DataLoader`` with ``N``
worker processes, as in training, and the rate is images per second out of the loader (after a
warm-up that starts the workers). At COCO's input size, with the COCO configs' augmentation::

    python dev/benchmark_data.py --num-images 32 --image-size 256 --repeats 2
    python dev/benchmark_data.py --image-size 1333 --workers 2 --types mixup cutmix cutnmix \
        --config-file configs/COCO-Distillation/faster_rcnn_R101_to_R50_FPN_1x_ssim.yaml \
        INPUT.MIN_SIZE_TRAIN "(800,)"
"""

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch
from tabulate import tabulate
from tqdm import tqdm

from detectron2.data import DatasetMapper
from detectron2.data.datasets import load_coco_json
from kd_det.config import get_kd_cfg
from kd_det.data.mix import MIX_TYPES, MixedSampleDatasetMapper

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


def photo_dataset(root, num_images, image_size, seed=0):
    """skimage photos resized to ``image_size`` on the long side, as JPEG, with random boxes."""
    import cv2
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    dicts = []
    for i in range(num_images):
        img = getattr(skdata, PHOTOS[i % len(PHOTOS)])()
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        scale = image_size / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)))
        h, w = img.shape[:2]
        path = os.path.join(root, f"{i:06d}.jpg")
        cv2.imwrite(path, img[:, :, ::-1])
        annos = []
        for _ in range(int(rng.integers(1, 8))):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annos.append({"bbox": [x, y, bw, bh], "bbox_mode": 1, "category_id": int(i % 3)})
        dicts.append(
            {"file_name": path, "height": h, "width": w, "image_id": i, "annotations": annos}
        )
    return dicts


def synthetic_dataset(root, num_images, image_size):
    """The project's generated scenes (train split) in detectron2's format."""
    from kd_det.data.synthetic import generate_dataset

    info = generate_dataset(root, num_images, 1, image_size, seed=0, show_progress=False)
    return load_coco_json(info["train_json"], os.path.join(root, "train"), "kd_det_bench_train")


def time_pass(mapper, dicts, order, bar):
    """Images per second of ``mapper`` over the images ``order``."""
    np.random.seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    for i in order:
        mapper(copy.deepcopy(dicts[i]))
        bar.update(1)
    return len(order) / (time.perf_counter() - start)


def benchmark(builders, dicts, repeats, warmup):
    """Median images/s of each mapper over ``repeats`` interleaved passes.

    Passes of all mappers alternate, so load from other processes on a shared machine hits them
    alike; each mapper first maps ``warmup`` images untimed (file cache, lazy imports, and a full
    partner cache for the cached variants).
    """
    mappers = [build() for build in builders]
    total = len(mappers) * (warmup + repeats * len(dicts))
    speeds = [[] for _ in mappers]
    with tqdm(total=total, desc="mapping", unit="img") as bar:
        for mapper in mappers:
            for i in range(warmup):
                mapper(copy.deepcopy(dicts[i % len(dicts)]))
                bar.update(1)
        for r in range(repeats):
            order = np.random.default_rng(r).permutation(len(dicts))
            for k, mapper in enumerate(mappers):
                speeds[k].append(time_pass(mapper, dicts, order, bar))
    return [float(np.median(s)) for s in speeds]


class _Mapped(torch.utils.data.Dataset):
    """``length`` samples cycling over ``dicts``, each mapped by ``mapper`` in the worker."""

    def __init__(self, dicts, mapper, length):
        self.dicts, self.mapper, self.length = dicts, mapper, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.mapper(copy.deepcopy(self.dicts[i % len(self.dicts)]))


def benchmark_workers(builders, dicts, repeats, workers, warmup):
    """Median images/s out of a ``DataLoader`` with ``workers`` processes, per mapper.

    Each pass builds a loader over ``len(dicts)`` timed samples after ``warmup`` untimed ones
    (worker start-up, first partner reads); passes of the mappers alternate as in
    :func:`benchmark`.
    """
    speeds = [[] for _ in builders]
    n = len(dicts)
    for r in range(repeats):
        for k, build in enumerate(builders):
            dataset = _Mapped(dicts, build(), warmup + n)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=workers, collate_fn=lambda x: x
            )
            it = iter(loader)
            for _ in range(warmup):
                next(it)
            start = time.perf_counter()
            for _ in range(n):
                next(it)
            speeds[k].append(n / (time.perf_counter() - start))
            del it, loader
    return [float(np.median(s)) for s in speeds]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=32, help="images in the dataset")
    parser.add_argument("--image-size", type=int, default=256, help="side of the stored images")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mapper (median)")
    parser.add_argument("--source", choices=["synthetic", "photos"], default="photos")
    parser.add_argument("--prob", type=float, default=1.0, help="INPUT.MIX.PROB of the mix mappers")
    parser.add_argument(
        "--cache-size", type=int, default=8, help="partner cache of the cached rows"
    )
    parser.add_argument("--types", nargs="+", default=list(MIX_TYPES), choices=MIX_TYPES)
    parser.add_argument(
        "--config-file", default="", help="config for INPUT.* (default: detectron2's)"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes (0: in this process)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def measure(args):
    """Images/s of the plain mapper and of every mix type (fresh and cached partners).

    Returns:
        tuple: ``(rows, description)``; rows are ``(mapper name, images/s)``, plain first.
    """
    torch.set_num_threads(1)  # data loading runs in single-threaded workers
    cfg = get_kd_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.INPUT.MIX.ENABLED = True
    cfg.INPUT.MIX.PROB = args.prob

    with tempfile.TemporaryDirectory() as root:
        if args.source == "synthetic":
            dicts = synthetic_dataset(root, args.num_images, args.image_size)
        else:
            dicts = photo_dataset(root, args.num_images, args.image_size)
        runs = [("plain DatasetMapper", lambda: DatasetMapper(cfg, is_train=True))]
        for mix_type in args.types:
            for cache in (0, args.cache_size):
                c = cfg.clone()
                c.INPUT.MIX.TYPE = mix_type

                def build(c=c, cache=cache):
                    return MixedSampleDatasetMapper(
                        c, is_train=True, dataset_dicts=dicts, partner_cache_size=cache
                    )

                runs.append((f"{mix_type}" + (f" (cache {cache})" if cache else ""), build))
        if args.workers > 0:
            warmup = args.workers * (args.cache_size + 2)
            speeds = benchmark_workers(
                [b for _, b in runs], dicts, args.repeats, args.workers, warmup
            )
        else:
            speeds = benchmark([b for _, b in runs], dicts, args.repeats, args.cache_size + 2)
        rows = [(name, ips) for (name, _), ips in zip(runs, speeds)]
    desc = (
        f"{len(dicts)} images ({args.source}) of {args.image_size} px, "
        f"median of {args.repeats} passes, "
        f"INPUT.MIN_SIZE_TRAIN {tuple(cfg.INPUT.MIN_SIZE_TRAIN)}, MAX {cfg.INPUT.MAX_SIZE_TRAIN}, "
        f"mix prob {args.prob}, "
        + (f"{args.workers} loader workers" if args.workers else "in one process")
    )
    return rows, desc


def markdown(rows):
    base = rows[0][1]
    table = [(name, f"{ips:.1f}", f"{ips / base:.2f}") for name, ips in rows]
    return tabulate(table, headers=["mapper", "images/s", "ratio to plain"], tablefmt="github")


def main(argv=None):
    rows, desc = measure(parse_args(argv))
    print("\n" + desc)
    print(markdown(rows))


if __name__ == "__main__":
    main()
