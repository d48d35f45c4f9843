#!/usr/bin/env python
"""Draw the same validation images side by side: ground truth, teacher, student, distilled student.

    python tools/compare_predictions.py \\
        --distilled-config configs/Synthetic/distill_lite2_to_lite0_ssim.yaml \\
        --distilled-weights output/synthetic/distill_lite2_to_lite0_ssim/model_final.pth \\
        --student-config configs/Synthetic/faster_rcnn_lite0_FPN.yaml \\
        --student-weights output/synthetic/faster_rcnn_lite0_FPN/model_final.pth \\
        --num-images 4 --score-threshold 0.5 --output compare.png

writes one PNG: a row per image, a column per model (with a title row), each model's detections
above the threshold drawn by detectron2's ``Visualizer``. Numbers say how much distillation helped;
this picture shows where (missed objects, duplicates, confused classes).

* The teacher defaults to the distilled config's ``MODEL.KD.TEACHER`` (config, weights, opts);
  ``--teacher-config``/``--teacher-weights`` name another one. Omit a model to leave out its
  column (at least one model is needed).
* A distillation config is drawn as its student alone (a plain ``GeneralizedRCNN``: its checkpoint
  holds exactly the student, plus adapters that inference ignores).
* Every model sees the first config's test size (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``), as
  ``--eval-teacher`` does, through detectron2's ``DefaultPredictor`` (its own input format).
* The dataset is ``--dataset`` or the first config's ``DATASETS.TEST[0]``, registered like
  ``tools/train_net.py`` does (``DATASETS.COCO``, generated data); ``KEY VALUE`` overrides after
  the flags apply to every config (e.g. ``DATASETS.SYNTHETIC_ROOT``, ``DATASETS.COCO``).
"""

import argparse
import os

import numpy as np

#: Height in pixels of the title row above the columns.
HEADER = 28
COLUMNS = (("teacher", "teacher"), ("student", "student alone"), ("distilled", "distilled student"))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, label in COLUMNS:
        p.add_argument(f"--{key}-config", default="", help=f"config of the {label}")
        p.add_argument(f"--{key}-weights", default="", help=f"weights of the {label}")
    p.add_argument("--dataset", default="", help="default: DATASETS.TEST[0] of the first config")
    p.add_argument("--num-images", type=_at_least(1, int), default=4,
                   help="first N images of the dataset (N >= 1)")  # fmt: skip
    p.add_argument("--score-threshold", type=float, default=0.5, help="draw detections above")
    p.add_argument("--scale", type=_at_least(0, float), default=0.0,
                   help="drawing scale; 0: enlarge small images to about 320 px")  # fmt: skip
    p.add_argument("--output", required=True, type=_image_file,
                   help=f"image file to write ({', '.join(IMAGE_EXTENSIONS)})")  # fmt: skip
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every config")
    return p


#: What ``--output`` may end with (formats PIL writes without options).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _at_least(low, kind):
    """An argparse type: a ``kind`` number >= ``low`` (``--num-images -2`` used to draw 2)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def _image_file(text):
    """An argparse type: a path ending in one of :data:`IMAGE_EXTENSIONS`, not a directory."""
    if os.path.splitext(text)[1].lower() not in IMAGE_EXTENSIONS:
        raise argparse.ArgumentTypeError(
            f"'{text}' must end with {', '.join(IMAGE_EXTENSIONS)} (the grid is one image)"
        )
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"'{text}' is a directory")
    return text


def check_args(parser, args):
    """Checks that need no model: score range, every local weights file exists."""
    if not 0 <= args.score_threshold <= 1:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    for key, _ in COLUMNS:
        weights = getattr(args, f"{key}_weights")
        if weights and "://" not in weights and not os.path.isfile(weights):
            parser.error(f"--{key}-weights '{weights}' does not exist.")


def _load_cfg(config_file, weights, opts):
    from kd_det.config import get_kd_cfg
    from kd_det.engine.trainer import fall_back_to_cpu

    cfg = get_kd_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = weights
    fall_back_to_cpu(cfg)
    return cfg


def _inference_cfg(cfg, reference):
    """``cfg`` made ready for ``DefaultPredictor``: the student of a distillation config, no
    ImageNet download, ``reference``'s test size."""
    cfg = cfg.clone()
    cfg.defrost()
    from kd_det.modeling.common import STUDENT_ARCHITECTURES

    if cfg.MODEL.META_ARCHITECTURE in STUDENT_ARCHITECTURES:
        cfg.MODEL.META_ARCHITECTURE = STUDENT_ARCHITECTURES[cfg.MODEL.META_ARCHITECTURE]
    if "EFFICIENTNET" in cfg.MODEL:
        cfg.MODEL.EFFICIENTNET.PRETRAINED = False  # the checkpoint replaces ImageNet weights
    cfg.INPUT.MIN_SIZE_TEST = reference.INPUT.MIN_SIZE_TEST
    cfg.INPUT.MAX_SIZE_TEST = reference.INPUT.MAX_SIZE_TEST
    cfg.MODEL.DEVICE = reference.MODEL.DEVICE
    return cfg


def model_configs(args):
    """``[(column title, inference cfg)]`` in column order, and the reference (first) config."""
    given = {}
    for key, label in COLUMNS:
        config, weights = getattr(args, f"{key}_config"), getattr(args, f"{key}_weights")
        if bool(config) != bool(weights):
            raise SystemExit(f"--{key}-config and --{key}-weights go together.")
        if config:
            given[key] = (label, _load_cfg(config, weights, args.opts), config)
    if "teacher" not in given and "distilled" in given:
        kd_cfg = given["distilled"][1]
        from kd_det.modeling.common import STUDENT_ARCHITECTURES

        distilled = kd_cfg.MODEL.META_ARCHITECTURE in STUDENT_ARCHITECTURES
        if distilled and kd_cfg.MODEL.KD.TEACHER.WEIGHTS:
            from kd_det.modeling.teacher import build_teacher_cfg

            teacher_file = kd_cfg.MODEL.KD.TEACHER.CONFIG_FILE
            given["teacher"] = ("teacher", build_teacher_cfg(kd_cfg), teacher_file)
    if not given:
        raise SystemExit("Give at least one model (--teacher/--student/--distilled-config).")
    reference = next(given[k][1] for k in ("distilled", "student", "teacher") if k in given)
    columns = [
        (given[k][0], _inference_cfg(given[k][1], reference), given[k][2])
        for k, _ in COLUMNS
        if k in given
    ]
    return columns, reference


def build_predictor(title, cfg, config_file):
    """detectron2's ``DefaultPredictor`` for ``cfg``, its weights read as data only and refused
    (keys named) when they do not fit ``config_file``: fvcore would load them partly, with one
    "Skip loading" line per key, and draw a half-random model's boxes."""
    from detectron2.engine import DefaultPredictor

    from kd_det.checkpoint import SafeDetectionCheckpointer

    blank = cfg.clone()
    blank.defrost()
    blank.MODEL.WEIGHTS = ""  # DefaultPredictor's own load is neither safe nor strict
    predictor = DefaultPredictor(blank)
    checkpointer = SafeDetectionCheckpointer(predictor.model)
    checkpointer.refuse_mismatch(f"The {title}'s weights", config_file).load(cfg.MODEL.WEIGHTS)
    return predictor


def _title_row(titles, cell_w):
    from PIL import Image, ImageDraw

    row = Image.new("RGB", (cell_w * len(titles), HEADER), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    for i, title in enumerate(titles):
        draw.text((i * cell_w + 6, HEADER // 2 - 6), title, fill=(0, 0, 0))
    return np.asarray(row)


def compare_predictions(args):
    """Draw the grid (see the module docstring); returns the output path and the grid's shape."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer
    from PIL import Image

    from kd_det.data.builtin import register_datasets_from_config

    columns, reference = model_configs(args)
    data_cfg = reference.clone()
    data_cfg.defrost()
    dataset = args.dataset or (data_cfg.DATASETS.TEST[0] if data_cfg.DATASETS.TEST else "")
    if not dataset:
        raise SystemExit("No dataset: pass --dataset or set DATASETS.TEST in the config.")
    data_cfg.DATASETS.TRAIN, data_cfg.DATASETS.TEST = (), (dataset,)
    register_datasets_from_config(data_cfg)
    dicts = DatasetCatalog.get(dataset)[: args.num_images]
    metadata = MetadataCatalog.get(dataset)
    predictors = [build_predictor(title, cfg, config) for title, cfg, config in columns]

    rows = []
    for d in dicts:
        bgr = read_image(d["file_name"], format="BGR")
        rgb = bgr[:, :, ::-1]
        scale = args.scale or max(1.0, 320.0 / min(rgb.shape[:2]))
        cells = [Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(d).get_image()]
        for predictor in predictors:
            with torch.no_grad():
                inst = predictor(bgr)["instances"].to("cpu")
            inst = inst[inst.scores >= args.score_threshold]
            vis = Visualizer(rgb, metadata, scale=scale)
            cells.append(vis.draw_instance_predictions(inst).get_image())
        rows.append(cells)
    cell_h = max(c.shape[0] for r in rows for c in r)
    cell_w = max(c.shape[1] for r in rows for c in r)

    def pad(img):
        out = np.full((cell_h, cell_w, 3), 255, dtype=np.uint8)
        out[: img.shape[0], : img.shape[1]] = img
        return out

    titles = ["ground truth"] + [title for title, _, _ in columns]
    grid = np.concatenate(
        [_title_row(titles, cell_w)] + [np.concatenate([pad(c) for c in r], axis=1) for r in rows]
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    Image.fromarray(grid).save(args.output)
    return args.output, grid.shape


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    import kd_det  # noqa: F401  (registers kd_det's components)
    from kd_det.checkpoint import UnsafeFileError, WeightsMismatchError
    from kd_det.config import ConfigFileError

    try:
        path, shape = compare_predictions(args)
    except (WeightsMismatchError, UnsafeFileError, ConfigFileError) as e:
        raise SystemExit(f"compare_predictions.py: error: {e}")
    print(f"Wrote {path} ({shape[1]}x{shape[0]} px)")
    return path


if __name__ == "__main__":
    main()
