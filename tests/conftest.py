"""Shared fixtures: a tiny generated COCO dataset, a tiny-model config builder, and the images of
the mixed-sample mapper tests."""

import itertools
import os

#: Kernels capped at AVX2 for the whole suite, before torch loads (the same caps as the demo and the
#: study, ``ISA_CAP`` in kd_det/utils/runs.py): an AVX2 and an AVX-512 machine of one vendor then
#: compute the same bits. Across vendors MKL and oneDNN still differ in the last bits, so the golden
#: tests compare within a measured tolerance (tests/modeling/test_golden_losses.py). A caller's own
#: settings win.
ISA_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2"}  # fmt: skip
for _key, _value in ISA_CAP.items():
    os.environ.setdefault(_key, _value)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from skimage import data as skdata  # noqa: E402

from detectron2.structures import BoxMode  # noqa: E402
from kd_det.config import get_kd_cfg  # noqa: E402
from kd_det.utils.testing import file_digests  # noqa: E402,F401  (tests import it from here)
from kd_det.utils.testing import save_random_detector, tiny_overrides  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# Keep CPU tests predictable on a 2-core machine.
torch.set_num_threads(2)

#: Tiny R18-FPN detector (BN, from scratch): the student and teacher of most model tests.
R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
#: Every offline distillation term switched on.
ALL_TERMS = [
    "MODEL.KD.FEATURE.WEIGHTS", "[1.0]",
    "MODEL.KD.FEATURE.FOREGROUND_WEIGHT", "2.0",
    "MODEL.KD.BACKBONE.LEVELS", "['res2']",
    "MODEL.KD.RPN.OBJECTNESS_WEIGHT", "1.0",
    "MODEL.KD.RPN.DELTAS_WEIGHT", "1.0",
    "MODEL.KD.ROI.CLS_WEIGHT", "1.0",
    "MODEL.KD.ROI.BOX_WEIGHT", "1.0",
]  # fmt: skip


def tiny_cfg(tmp_path, *extra, base=R18):
    """``base`` merged with :func:`tiny_overrides` and ``extra``."""
    cfg = get_kd_cfg()
    cfg.merge_from_file(base)
    cfg.merge_from_list(tiny_overrides(tmp_path) + list(extra))
    return cfg


def distillation_cfg(tmp_path, teacher_ckpt, *extra):
    """A tiny R18 ``DistillationRCNN`` config whose teacher is the ``teacher_ckpt`` fixture."""
    return tiny_cfg(
        tmp_path,
        "MODEL.META_ARCHITECTURE", "DistillationRCNN",
        "MODEL.KD.TEACHER.CONFIG_FILE", R18,
        "MODEL.KD.TEACHER.WEIGHTS", teacher_ckpt["path"],
        "MODEL.KD.TEACHER.OPTS", str(teacher_ckpt["opts"]),
        *extra,
    )  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """16 train / 8 val generated scenes of 64 px (generated once per test session)."""
    from kd_det.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(str(root), num_train=16, num_val=8, image_size=64, seed=0, show_progress=False)
    return str(root)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory):
    """A saved tiny R18-FPN teacher with 48 FPN channels (32-channel students need adapters):
    ``{"path": checkpoint, "opts": the overrides it was built with}``."""
    d = tmp_path_factory.mktemp("teacher")
    opts = tiny_overrides(d) + ["MODEL.FPN.OUT_CHANNELS", "48"]
    r18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
    return save_random_detector(r18, d, opts, seed=123)


class _Records(list):
    """Log records captured by :func:`kd_log`; ``text`` joins their messages."""

    @property
    def text(self):
        return "\n".join(r.getMessage() for r in self)


@pytest.fixture
def kd_log():
    """Records of kd_det's loggers at INFO and above.

    pytest's ``caplog`` listens on the root logger, which kd_det's records do not reach once
    ``setup_logger(name="kd_det")`` (tools/train_net.py, KDTrainer) turned propagation off; this
    handler sits on the "kd_det" logger itself.
    """
    import logging

    records = _Records()
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = logging.getLogger("kd_det")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


def write_coco_dataset(
    root, num_images=6, size=64, seed=0, categories=((1, "disc"), (2, "bar"), (5, "square"))
):
    """A COCO dataset written the way pycocotools-based tools write one, not by kd_det's generator.

    Category ids start at 1 and have a gap (1, 2, 5 by default), ``file_name`` has a subfolder
    (``sub/img_0001.jpg``), image ids start at 1, annotations carry ``area`` and ``iscrowd``.
    Each image holds two to three filled shapes drawn with PIL, one colour per category.

    Returns:
        tuple(str, str): the json file and the image root.
    """
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    colors = [(230, 40, 40), (40, 200, 40), (40, 60, 230), (220, 200, 30)]
    os.makedirs(os.path.join(root, "images", "sub"), exist_ok=True)
    images, annotations = [], []
    for i in range(1, num_images + 1):
        im = Image.new("RGB", (size, size), (90, 90, 90))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 4))):
            k = int(rng.integers(len(categories)))
            w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            shape = draw.ellipse if k == 0 else draw.rectangle
            shape([x, y, x + w - 1, y + h - 1], fill=colors[k % len(colors)])
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "category_id": categories[k][0], "bbox": [x, y, w, h],
                                "area": float(w * h), "iscrowd": 0})  # fmt: skip
        name = f"sub/img_{i:04d}.jpg"
        im.save(os.path.join(root, "images", name), quality=95)
        images.append({"id": i, "file_name": name, "width": size, "height": size})
    data = {
        "info": {"description": "written by a test, pycocotools conventions"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": n, "supercategory": "shape"} for c, n in categories],
    }
    json_file = os.path.join(root, "annotations.json")
    with open(json_file, "w") as f:
        json.dump(data, f)
    return json_file, os.path.join(root, "images")


# -------------------------------------------------------------------------------------------------
# Images for the mixed-sample mapper tests (tests/data/test_mix_*.py, helpers in
# tests/data/mix_properties.py)
# -------------------------------------------------------------------------------------------------
#: Colours of the classes in ``colour_dicts``.
MIX_PALETTE = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8
)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def random_annos(rng, h, w, n, num_classes=5):
    """Random XYWH boxes (some tiny, some at the border) and one crowd box that must be ignored."""
    annos = []
    for _ in range(n):
        bw, bh = rng.uniform(1, w), rng.uniform(1, h)
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        annos.append(
            {
                "bbox": [x, y, bw, bh],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": int(rng.integers(num_classes)),
            }
        )
    if n:
        annos.append(
            {
                "bbox": [0, 0, w / 2, h / 2],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 0,
                "iscrowd": 1,
            }
        )
    return annos


@pytest.fixture(scope="module")
def photo_dicts(tmp_path_factory):
    """skimage photos as JPEG (camera: grayscale JPEG) with random boxes; one image unlabeled."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    dicts = []
    for i, name in enumerate(PHOTOS):
        img = getattr(skdata, name)()
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
        path = str(root / f"{name}.jpg")
        cv2.imwrite(path, img if img.ndim == 2 else img[:, :, ::-1])
        h, w = img.shape[:2]
        n = 0 if name == "coffee" else int(rng.integers(3, 9))
        dicts.append(
            {
                "file_name": path,
                "height": h,
                "width": w,
                "image_id": i,
                "annotations": random_annos(rng, h, w, n),
            }
        )
    return dicts


@pytest.fixture(scope="module")
def noise_dicts(tmp_path_factory):
    """Random-noise PNGs of very different sizes and aspect ratios, including tiny ones."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(1)
    dicts = []
    for i, (h, w) in enumerate([(40, 60), (75, 33), (8, 11), (64, 64), (3, 5), (50, 120)]):
        path = str(root / f"{i}.png")
        cv2.imwrite(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        annos = random_annos(rng, h, w, int(rng.integers(0, 6)))
        dicts.append(
            {"file_name": path, "height": h, "width": w, "image_id": i, "annotations": annos}
        )
    return dicts


@pytest.fixture(scope="module")
def colour_dicts(tmp_path_factory):
    """Black PNGs with non-overlapping solid rectangles whose colour encodes their class."""
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(2)
    dicts = []
    for i, (h, w) in enumerate([(90, 120), (120, 80), (100, 100), (70, 150)]):
        img = np.zeros((h, w, 3), np.uint8)
        annos = []
        for gx, gy in itertools.product(range(3), range(2)):
            cw, ch = w // 3, h // 2
            x0, y0 = gx * cw + int(rng.integers(1, 4)), gy * ch + int(rng.integers(1, 4))
            x1, y1 = x0 + int(rng.integers(cw // 2, cw - 4)), y0 + int(
                rng.integers(ch // 2, ch - 4)
            )
            c = int(rng.integers(len(MIX_PALETTE)))
            img[y0:y1, x0:x1] = MIX_PALETTE[c]
            annos.append(
                {"bbox": [x0, y0, x1, y1], "bbox_mode": BoxMode.XYXY_ABS, "category_id": c}
            )
        path = str(root / f"{i}.png")
        cv2.imwrite(path, img[:, :, ::-1])
        dicts.append(
            {"file_name": path, "height": h, "width": w, "image_id": i, "annotations": annos}
        )
    return dicts
