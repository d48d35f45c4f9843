"""Tests for kd_det.data.synthetic_scene: class list, boxes inside the image, per-image seeding."""

import numpy as np

from kd_det.data import synthetic_scene

SIZE = 64


def test_class_names():
    assert 10 <= len(synthetic_scene.CLASS_NAMES) <= 14
    assert len(set(synthetic_scene.CLASS_NAMES)) == len(synthetic_scene.CLASS_NAMES)


def test_generate_scene_boxes_inside_image():
    for i in range(20):
        image, anns = synthetic_scene.generate_scene(synthetic_scene.image_rng(3, "train", i), 96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96
            assert 1 <= ann["category_id"] <= len(synthetic_scene.CLASS_NAMES)
            assert 0 < ann["area"] <= w * h
            assert ann["iscrowd"] == 0


def test_image_depends_only_on_seed_split_index():
    a, _ = synthetic_scene.generate_scene(synthetic_scene.image_rng(0, "train", 5), SIZE)
    b, _ = synthetic_scene.generate_scene(synthetic_scene.image_rng(0, "train", 5), SIZE)
    c, _ = synthetic_scene.generate_scene(synthetic_scene.image_rng(0, "val", 5), SIZE)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
