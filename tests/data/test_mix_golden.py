"""Golden outputs of MixedSampleDatasetMapper: a digest of every mixed image, box and class.

``golden/mix.json`` was recorded before the mapper was split into ``kd_det/data/mix/`` (issue
14); the split must reproduce every output exactly (same random draws in the same order).
Regenerate only for an intended change:
``KD_DET_WRITE_GOLDEN=1 pytest tests/data/test_mix_golden.py``.
"""

import hashlib
import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from kd_det.data.mix import MixedSampleDatasetMapper

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "mix.json")
CASES = {
    "mixup": dict(mix_type="mixup"),
    "cutmix": dict(mix_type="cutmix"),
    "cutnmix": dict(mix_type="cutnmix", num_patches=3, box_rule="shrink"),
    "mosaic": dict(mix_type="mosaic"),
    "cutnmix_cache": dict(mix_type="cutnmix", partner_cache_size=2),
}


@pytest.fixture(scope="module")
def dicts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixgold")
    rng = np.random.default_rng(5)
    out = []
    for i, (h, w) in enumerate([(48, 64), (64, 40), (30, 30), (56, 72)]):
        path = str(root / f"{i}.png")
        cv2.imwrite(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        annos = []
        for _ in range(4):
            bw, bh = rng.uniform(2, w / 2), rng.uniform(2, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            annos.append(
                {"bbox": [x, y, bw, bh], "bbox_mode": BoxMode.XYWH_ABS,
                 "category_id": int(rng.integers(3))}
            )  # fmt: skip
        out.append(
            {"file_name": path, "height": h, "width": w, "image_id": i, "annotations": annos}
        )
    return out


def run_case(dicts, name):
    torch.manual_seed(0)
    np.random.seed(0)
    mapper = MixedSampleDatasetMapper(
        True,
        augmentations=[T.ResizeShortestEdge((40, 56), 96, "choice"), T.RandomFlip()],
        image_format="BGR",
        mix_enabled=True,
        mix_prob=0.8,
        dataset_dicts=dicts,
        **CASES[name],
    )
    digests = []
    for k in range(8):
        ret = mapper(dict(dicts[k % len(dicts)]))
        h = hashlib.sha256(ret["image"].numpy().tobytes())
        h.update(ret["instances"].gt_boxes.tensor.numpy().tobytes())
        h.update(ret["instances"].gt_classes.numpy().tobytes())
        digests.append(h.hexdigest())
    return digests


@pytest.mark.parametrize("name", sorted(CASES))
def test_mixed_outputs_equal_golden(dicts, name):
    got = run_case(dicts, name)
    data = {}
    if os.path.isfile(GOLDEN):
        with open(GOLDEN) as f:
            data = json.load(f)
    if os.environ.get("KD_DET_WRITE_GOLDEN") or name not in data:
        data[name] = got
        with open(GOLDEN, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        pytest.skip(f"golden outputs of {name} written")
    assert got == data[name]
