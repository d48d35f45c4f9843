#!/usr/bin/env python
"""Write PNGs of mixed training samples with their ground-truth boxes, to eyeball the box rules.

Samples go through :class:`kd_det.data.mix.MixedSampleDatasetMapper` built from the
config exactly as in training (same augmentations, same ``INPUT.MIX`` rules), except that every
sample is mixed (``--prob``, default 1). Boxes are drawn with detectron2's ``Visualizer`` and the
class names of the training set's metadata; pasted regions / mosaic quadrants are outlined with
dashed white rectangles; file names end with the mix type (or "plain").

The training set is ``DATASETS.TRAIN`` of the config, any registered dataset. Generated scenes
(``synthetic*_train``, and the default when the config names no training set) are registered from
``--dataset-root`` (default ``DATASETS.SYNTHETIC_ROOT``); if that directory holds no data yet, a
small set is generated there first.

Examples::

    python tools/visualize_mix.py --num 8 --type mosaic --output output/mix_vis
    python tools/visualize_mix.py --config-file configs/my.yaml --type cutnmix \\
        INPUT.MIX.BOX_RULE shrink INPUT.MIX.NUM_PATCHES 4
"""

import argparse
import copy
import os

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import detection_utils as utils
from detectron2.utils.env import seed_all_rng
from detectron2.utils.visualizer import Visualizer
from kd_det.config import get_kd_cfg
from kd_det.data.mix import MIX_TYPES, MixedSampleDatasetMapper

DEFAULT_ROOT = "datasets/synthetic"


def prepare_train_datasets(cfg, dataset_root=None, num_synthetic=32, image_size=192):
    """Make sure every training set of ``cfg`` is registered; use generated scenes if none is named.

    Returns:
        tuple[str]: the training dataset names (also written to ``cfg.DATASETS.TRAIN``).
    """
    if cfg.DATASETS.get("COCO"):
        from kd_det.data.builtin import register_coco_from_config

        register_coco_from_config(cfg)  # your own COCO-format data (DATASETS.COCO)
    root = dataset_root or cfg.DATASETS.get("SYNTHETIC_ROOT", DEFAULT_ROOT)
    names = list(cfg.DATASETS.TRAIN) or ["synthetic_train"]
    for name in names:
        if name in DatasetCatalog.list():
            continue
        if not (name.startswith("synthetic") and name.endswith("_train")):
            raise KeyError(f"Dataset {name!r} is not registered; register it or pass a config.")
        from kd_det.data.synthetic import generate_dataset, register_synthetic_coco

        if not os.path.isfile(os.path.join(root, "train.json")):
            print(f"No generated data in {root}; generating {num_synthetic} training scenes there.")
            generate_dataset(root, num_synthetic, max(num_synthetic // 4, 1), image_size, seed=0)
        register_synthetic_coco(name[: -len("_train")], root)
    cfg.DATASETS.TRAIN = tuple(names)
    return tuple(names)


def draw(record, cfg, metadata):
    """RGB image of one mapped sample with its boxes and the mixed regions outlined."""
    image = utils.convert_image_to_rgb(record["image"].permute(1, 2, 0), cfg.INPUT.FORMAT)
    vis = Visualizer(image, metadata=metadata)
    info = record.get("mix_info", {})
    for layer in info.get("layers", [])[1 if info.get("type") != "mosaic" else 0 :]:
        x0, y0, x1, y1 = layer["region"]
        if x1 > x0 and y1 > y0 and info["type"] != "mixup":
            vis.draw_box((x0, y0, x1, y1), alpha=0.9, edge_color="w", line_style="--")
    instances = record.get("instances")
    if instances is not None and len(instances):
        names = metadata.get("thing_classes", None)
        classes = instances.gt_classes.tolist()
        labels = [names[c] if names and c < len(names) else str(c) for c in classes]
        vis.overlay_instances(boxes=instances.gt_boxes.tensor.numpy(), labels=labels)
    return vis.output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="", metavar="FILE", help="config (optional)")
    parser.add_argument("--num", type=int, default=8, help="number of samples to write")
    parser.add_argument("--output", default="output/visualize_mix", help="directory for the PNGs")
    parser.add_argument("--type", choices=MIX_TYPES, default=None, help="override INPUT.MIX.TYPE")
    parser.add_argument("--prob", type=float, default=1.0, help="override INPUT.MIX.PROB")
    parser.add_argument("--dataset-root", default=None, help="root of the generated scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of sample choice and mixing")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)

    cfg = get_kd_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.INPUT.MIX.ENABLED = True
    cfg.INPUT.MIX.PROB = args.prob
    if args.type:
        cfg.INPUT.MIX.TYPE = args.type
    # Masks and keypoints cannot be mixed; boxes are all this tool shows anyway.
    cfg.MODEL.MASK_ON = cfg.MODEL.KEYPOINT_ON = False
    names = prepare_train_datasets(cfg, args.dataset_root)

    seed_all_rng(args.seed)  # numpy (augmentations) and torch (the mapper's own stream)
    # The training set as the train loader loads it; also the mapper's pool of partners.
    dicts = get_detection_dataset_dicts(names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    mapper = MixedSampleDatasetMapper(cfg, is_train=True, dataset_dicts=dicts, return_mix_info=True)
    metadata = MetadataCatalog.get(names[0])
    os.makedirs(args.output, exist_ok=True)
    order = np.random.default_rng(args.seed).permutation(len(dicts))
    for i in range(args.num):
        record = mapper(copy.deepcopy(dicts[int(order[i % len(order)])]))
        kind = record.get("mix_info", {}).get("type") or "plain"
        path = os.path.join(args.output, f"{i:03d}_{kind}.png")
        draw(record, cfg, metadata).save(path)
        n = len(record["instances"]) if "instances" in record else 0
        print(f"{path}: {kind}, {tuple(record['image'].shape[-2:])}, {n} boxes")


if __name__ == "__main__":
    main()
