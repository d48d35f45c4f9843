"""Helpers of the mixed-sample mapper tests: a mapper builder and an independent property checker.

The mapper's ``return_mix_info`` record (layers with regions, fitted pixels and boxes before
clipping; for every output box its layer and index) lets each property be checked independently of
the implementation: visibility is recomputed by inclusion-exclusion (the mapper uses a different
algorithm), pixel ownership by painting the regions in order. The image fixtures these helpers run
on (``photo_dicts``, ``noise_dicts``, ``colour_dicts``) are in ``tests/conftest.py``.
"""

import copy
import itertools

import numpy as np
import pytest
import torch

from detectron2.data import transforms as T
from kd_det.data.mix import MixedSampleDatasetMapper, visible_geometry

TYPES = ("mixup", "cutmix", "cutnmix", "mosaic")
#: Colours of the classes in ``colour_dicts`` (tests/conftest.py).
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], np.uint8)


def make_mapper(dicts, mix_type, augs=None, fmt="RGB", **kw):
    """A mapper with small multi-scale resize + flip (different partner sizes) unless augs given."""
    if augs is None:
        augs = [T.ResizeShortestEdge((48, 64, 80), 128, "choice"), T.RandomFlip()]
    args = dict(
        mix_enabled=True,
        mix_type=mix_type,
        mix_prob=1.0,
        mix_alpha=1.0,
        num_patches=3,
        min_visible=0.3,
        min_box_size=2.0,
        box_rule="keep",
        dataset_dicts=dicts,
        return_mix_info=True,
    )
    args.update(kw)
    return MixedSampleDatasetMapper(True, augmentations=augs, image_format=fmt, **args)


def run(mapper, dicts, seed, index=None):
    np.random.seed(seed)
    torch.manual_seed(seed)
    return mapper(copy.deepcopy(dicts[seed % len(dicts) if index is None else index]))


def inter(a, b):
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def area(r):
    return max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)


def visible_area_ie(box, covers):
    """area(box - union(covers)) by inclusion-exclusion."""
    parts = [inter(box, c) for c in covers]
    union = 0.0
    for k in range(1, len(parts) + 1):
        for subset in itertools.combinations(parts, k):
            r = subset[0]
            for s in subset[1:]:
                r = inter(r, s)
            union += (-1) ** (k + 1) * area(r)
    return area(box) - union


def check_output(out, mapper, src_dict):
    """All properties of one mixed output against its mix_info."""
    info = out["mix_info"]
    image = out["image"]
    c, h, w = image.shape
    layers = info["layers"]
    assert out["file_name"] == src_dict["file_name"] and out["image_id"] == src_dict["image_id"]
    assert (out["height"], out["width"]) == (src_dict["height"], src_dict["width"])
    assert image.dtype == torch.uint8
    if mapper.mix_type != "mosaic":  # output has the main image's augmented size
        assert layers[0]["source"] == "main" and tuple(layers[0]["pixels"].shape) == (c, h, w)
    occluding = mapper.mix_type in ("cutmix", "cutnmix")

    # Pixels.
    if mapper.mix_type == "mixup":
        lam = info["lam"]
        expected = lam * layers[0]["pixels"].double() + (1 - lam) * layers[1]["pixels"].double()
        assert (image.double() - expected).abs().max() <= 0.5 + 1e-6
    else:
        owner = np.full((h, w), -1)
        for k, layer in enumerate(layers):
            x0, y0, x1, y1 = layer["region"]
            owner[y0:y1, x0:x1] = k
        if mapper.mix_type == "mosaic":
            assert (owner >= 0).all(), "mosaic quadrants must tile the frame"
        for k, layer in enumerate(layers):
            x0, y0, x1, y1 = layer["region"]
            if x1 <= x0 or y1 <= y0:
                continue
            mine = torch.from_numpy(owner[y0:y1, x0:x1] == k)
            assert tuple(layer["pixels"].shape) == (c, y1 - y0, x1 - x0)
            assert torch.equal(image[:, y0:y1, x0:x1][:, mine], layer["pixels"][:, mine])

    # Boxes.
    inst = out["instances"]
    boxes = inst.gt_boxes.tensor.numpy().astype(np.float64)
    classes = inst.gt_classes.numpy()
    assert inst.image_size == (h, w)
    assert len(boxes) == len(info["instance_layer"]) == len(info["instance_index"])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    kept = set()
    stats = {"dropped": 0, "kept_partner": 0, "shrunk": 0}
    for box, cls, k, j in zip(boxes, classes, info["instance_layer"], info["instance_index"]):
        layer = layers[k]
        kept.add((k, j))
        assert cls == layer["classes"][j], "class must come from the source box"
        rx0, ry0, rx1, ry1 = layer["region"]
        tol = 1e-4
        assert (
            rx0 - tol <= box[0]
            and ry0 - tol <= box[1]
            and box[2] <= rx1 + tol
            and box[3] <= ry1 + tol
        )
        src = layer["boxes"][j]
        clipped = inter(src, layer["region"])
        covers = [later["region"] for later in layers[k + 1 :]] if occluding else []
        vis = visible_area_ie(clipped, covers)
        assert vis / area(src) >= mapper.min_visible - 1e-6
        if k > 0 or mapper.mix_type == "mosaic" or np.abs(box - src).max() > 1e-3:  # changed box
            assert min(box[2] - box[0], box[3] - box[1]) >= mapper.min_box_size - 1e-3
        if mapper.box_rule == "keep":
            np.testing.assert_allclose(box, clipped, atol=1e-3)
        else:  # shrunk box inside the clipped box and still containing the whole visible part
            assert box[0] >= clipped[0] - tol and box[1] >= clipped[1] - tol
            assert box[2] <= clipped[2] + tol and box[3] <= clipped[3] + tol
            assert visible_area_ie(inter(clipped, box), covers) == pytest.approx(
                vis, rel=1e-4, abs=1e-3
            )
            stats["shrunk"] += int(np.abs(box - np.array(clipped)).max() > 1e-3)
    # Dropped boxes really failed a rule.
    for k, layer in enumerate(layers):
        covers = [later["region"] for later in layers[k + 1 :]] if occluding else []
        for j, src in enumerate(layer["boxes"]):
            if (k, j) in kept:
                continue
            clipped = inter(src, layer["region"])
            vis = visible_area_ie(clipped, covers) if area(clipped) > 0 else 0.0
            frac = vis / area(src) if area(src) > 0 else 0.0
            final = clipped
            if mapper.box_rule == "shrink" and vis > 0:  # bbox of the visible part (tested above)
                final = visible_geometry(np.array([clipped]), np.array(covers).reshape(-1, 4))[1][0]
            small = min(final[2] - final[0], final[3] - final[1]) < mapper.min_box_size + 1e-3
            assert vis <= 1e-9 or frac < mapper.min_visible + 1e-6 or small
            stats["dropped"] += 1
    stats["kept_partner"] += int((np.asarray(info["instance_layer"]) > 0).sum())
    return stats
