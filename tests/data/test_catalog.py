"""Each dataset parsed once while a run starts, and COCO categories read without a full parse
(kd_det/data/catalog.py)."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, get_detection_dataset_dicts

from conftest import CONFIGS, tiny_overrides, write_coco_dataset
from kd_det.data.catalog import parse_each_dataset_once, read_coco_categories


@pytest.fixture
def counted():
    """A registered dataset whose loads are counted."""
    calls = []

    def load():
        calls.append(1)
        return [{"file_name": "a.jpg", "image_id": 0, "height": 4, "width": 4, "annotations": []}]

    DatasetCatalog.register("kd_det_counted", load)
    yield calls
    DatasetCatalog.remove("kd_det_counted")


def test_one_parse_inside_the_block_and_none_kept_after(counted):
    with parse_each_dataset_once():
        first = DatasetCatalog.get("kd_det_counted")
        first.append("changed by one caller")  # another caller's list is not affected
        assert DatasetCatalog.get("kd_det_counted") == first[:1]
        get_detection_dataset_dicts(["kd_det_counted"], filter_empty=False)
        with parse_each_dataset_once():  # nested: the outer memo serves
            DatasetCatalog.get("kd_det_counted")
    assert len(counted) == 1
    DatasetCatalog.get("kd_det_counted")
    assert len(counted) == 2 and "get" not in vars(DatasetCatalog)


def test_a_dataset_registered_again_inside_the_block_is_loaded_again(counted):
    with parse_each_dataset_once():
        DatasetCatalog.get("kd_det_counted")
        load = DatasetCatalog["kd_det_counted"]
        DatasetCatalog.remove("kd_det_counted")
        DatasetCatalog.register("kd_det_counted", lambda: load()[:0])
        assert DatasetCatalog.get("kd_det_counted") == []
    assert len(counted) == 2


def test_trainer_start_parses_the_training_json_once(tmp_path, monkeypatch):
    """Input checks, the training loader and the mixing mapper's partners: one parse of the
    train json and one of the test json per process (there were three of the train json)."""
    import detectron2.data.datasets.coco as coco

    from kd_det.config import get_kd_cfg
    from kd_det.engine.trainer import KDTrainer

    train = write_coco_dataset(str(tmp_path / "train"), num_images=4, seed=0)
    val = write_coco_dataset(str(tmp_path / "val"), num_images=2, seed=1)
    loads = []
    real = coco.load_coco_json
    monkeypatch.setattr(
        coco, "load_coco_json", lambda f, *a, **k: loads.append(f) or real(f, *a, **k)
    )
    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml"))
    cfg.merge_from_list(
        tiny_overrides(tmp_path / "out")
        + ["DATASETS.COCO", json.dumps([["catalog_train", *train], ["catalog_val", *val]]),
           "DATASETS.TRAIN", "('catalog_train',)", "DATASETS.TEST", "('catalog_val',)",
           "MODEL.ROI_HEADS.NUM_CLASSES", "3", "INPUT.MIX.ENABLED", "True",
           "INPUT.MIX.TYPE", "cutmix", "SEED", "1"]  # fmt: skip
    )
    from kd_det.data.builtin import register_datasets_from_config

    register_datasets_from_config(cfg)
    KDTrainer(cfg)
    assert sorted(loads) == sorted([train[0], val[0]])


def test_categories_are_read_from_their_array_only(tmp_path, monkeypatch):
    """The categories come from decoding their array; a string elsewhere that holds the word is
    skipped; a file without the key falls back to a full parse; non-UTF-8 names the file."""
    path = tmp_path / "a.json"
    data = {
        "info": {"description": 'mentions "categories": in a string'},
        "images": [{"id": 1}],
        "annotations": [],
        "categories": [{"id": 5, "name": "square"}, {"id": 1, "name": "disc"}],
    }
    path.write_text(json.dumps(data))
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("full parse"))
    assert [c["name"] for c in read_coco_categories(str(path))] == ["square", "disc"]
    monkeypatch.undo()
    path.write_text(json.dumps({"images": []}))
    assert read_coco_categories(str(path)) == []
    path.write_bytes(json.dumps(data).replace("square", "carr\u00e9").encode("latin-1"))
    with pytest.raises(ValueError, match=r"a\.json' is not UTF-8"):
        read_coco_categories(str(path))
