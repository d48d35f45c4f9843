"""Tests for kd_det.data.synthetic: COCO validity, determinism, caching, CLI and registration."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from kd_det.data import synthetic

SIZE = 64


def _generate(root, seed=0, num_train=4, num_val=2):
    return synthetic.generate_dataset(
        str(root),
        num_train=num_train,
        num_val=num_val,
        image_size=SIZE,
        seed=seed,
        show_progress=False,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return _generate(root)


def test_coco_json_is_valid(dataset):
    from pycocotools.coco import COCO

    for split, n in (("train", 4), ("val", 2)):
        coco = COCO(dataset[f"{split}_json"])
        image_ids = [im["id"] for im in coco.dataset["images"]]
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        cat_ids = [c["id"] for c in coco.dataset["categories"]]
        assert len(image_ids) == n == len(set(image_ids))
        assert len(ann_ids) == len(set(ann_ids)) and len(ann_ids) > 0
        assert cat_ids == list(range(1, len(synthetic.CLASS_NAMES) + 1))
        assert [c["name"] for c in coco.dataset["categories"]] == synthetic.CLASS_NAMES
        images = {im["id"]: im for im in coco.dataset["images"]}
        for ann in coco.dataset["annotations"]:
            assert ann["image_id"] in images
            assert ann["category_id"] in cat_ids
            im = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        for im in images.values():
            path = os.path.join(dataset["root"], split, im["file_name"])
            with Image.open(path) as img:
                assert img.size == (im["width"], im["height"]) == (SIZE, SIZE)


def test_deterministic(tmp_path, dataset):
    same = _generate(tmp_path / "same", seed=0)
    other = _generate(tmp_path / "other", seed=1)
    for split in ("train", "val"):
        with open(dataset[f"{split}_json"], "rb") as a, open(same[f"{split}_json"], "rb") as b:
            assert a.read() == b.read()
        with open(other[f"{split}_json"], "rb") as c, open(same[f"{split}_json"], "rb") as b:
            assert c.read() != b.read()
    name = "000000.jpg"
    pixels = [
        np.asarray(Image.open(os.path.join(r["root"], "train", name)))
        for r in (dataset, same, other)
    ]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_idempotent_skip(tmp_path, capsys):
    first = _generate(tmp_path)
    assert not first["skipped"]
    mtime = os.path.getmtime(first["train_json"])
    second = synthetic.generate_dataset(str(tmp_path), 4, 2, SIZE, 0, show_progress=True)
    assert second["skipped"]
    assert "skipping" in capsys.readouterr().out
    assert os.path.getmtime(first["train_json"]) == mtime
    # Different parameters regenerate.
    third = _generate(tmp_path, num_train=3)
    assert not third["skipped"] and third["train"]["images"] == 3
    assert len(os.listdir(tmp_path / "train")) == 3
    # An interrupted run (meta.json missing, or an image missing) is redone.
    os.remove(tmp_path / "train" / "000001.jpg")
    fourth = _generate(tmp_path, num_train=3)
    assert not fourth["skipped"] and (tmp_path / "train" / "000001.jpg").exists()
    with open(tmp_path / "meta.json") as f:
        assert json.load(f)["num_train"] == 3


def test_register(dataset):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    train_name, val_name = synthetic.register_synthetic_coco("kd_test_synth", dataset["root"])
    assert (train_name, val_name) == ("kd_test_synth_train", "kd_test_synth_val")
    # Registering again with the same paths is a no-op, not an error.
    assert synthetic.register_synthetic_coco("kd_test_synth", dataset["root"]) == (
        train_name,
        val_name,
    )
    assert MetadataCatalog.get(train_name).thing_classes == synthetic.CLASS_NAMES
    dicts = DatasetCatalog.get(val_name)
    assert len(dicts) == 2
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert d["height"] == d["width"] == SIZE
        for ann in d["annotations"]:
            assert 0 <= ann["category_id"] < len(synthetic.CLASS_NAMES)
    assert MetadataCatalog.get(train_name).thing_classes == synthetic.CLASS_NAMES


def test_register_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        synthetic.register_synthetic_coco("kd_test_missing", str(tmp_path / "nothing"))
    message = str(excinfo.value)
    assert "make_synthetic_coco.py" in message
    assert os.path.join(str(tmp_path / "nothing"), "train.json") in message
    assert "--output" in message


def test_test_split_is_added_without_changing_train_and_val(tmp_path):
    import filecmp

    from detectron2.data import DatasetCatalog

    without = synthetic.generate_dataset(str(tmp_path / "a"), 3, 2, 64, 0, show_progress=False)
    with_test = synthetic.generate_dataset(
        str(tmp_path / "b"), 3, 2, 64, 0, show_progress=False, num_test=4
    )
    assert "test" not in without and with_test["test"]["images"] == 4
    for split in ("train", "val"):
        assert filecmp.cmp(without[f"{split}_json"], with_test[f"{split}_json"], shallow=False)
        names = sorted(os.listdir(tmp_path / "a" / split))
        assert filecmp.cmpfiles(tmp_path / "a" / split, tmp_path / "b" / split, names,
                                shallow=False)[0] == names  # fmt: skip
    names = synthetic.register_synthetic_coco("kd_test_three", with_test["root"])
    assert names == ("kd_test_three_train", "kd_test_three_val", "kd_test_three_test")
    assert len(DatasetCatalog.get("kd_test_three_test")) == 4
