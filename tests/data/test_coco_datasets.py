"""DATASETS.COCO: your own COCO-format data from the config or the command line, with clear errors.

The data is written here with pycocotools conventions (category ids 1, 2, 5; images in a
subfolder), not by kd_det's generator.
"""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import CONFIGS, REPO, tiny_overrides, write_coco_dataset
from kd_det.config import get_kd_cfg
from kd_det.data.builtin import register_datasets_from_config
from kd_det.utils.testing import run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_coco")
    train = write_coco_dataset(str(root / "train"), num_images=6, seed=0)
    val = write_coco_dataset(str(root / "val"), num_images=3, seed=1)
    return {"train": train, "val": val}


def _cfg(*opts):
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(list(opts))
    return cfg


def _entry_opts(name, json_file, image_root, num_classes=3):
    return [
        "DATASETS.COCO", json.dumps([[name, json_file, image_root]]),
        "DATASETS.TRAIN", f"('{name}',)",
        "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", str(num_classes),
    ]  # fmt: skip


def test_command_line_list_of_lists_registers_with_gapped_ids_and_subfolders(coco_data):
    json_file, image_root = coco_data["train"]
    cfg = _cfg(*_entry_opts("owncoco_cli_train", json_file, image_root))
    assert cfg.DATASETS.COCO == [["owncoco_cli_train", json_file, image_root]]
    register_datasets_from_config(cfg)
    register_datasets_from_config(cfg)  # idempotent
    meta = MetadataCatalog.get("owncoco_cli_train")
    assert meta.thing_classes == ["disc", "bar", "square"]  # known before loading the json
    dicts = DatasetCatalog.get("owncoco_cli_train")
    assert len(dicts) == 6
    assert dicts[0]["file_name"] == os.path.join(image_root, "sub", "img_0001.jpg")
    assert os.path.isfile(dicts[0]["file_name"])
    labels = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert labels <= {0, 1, 2} and 2 in labels  # id 5 -> contiguous label 2
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 5: 2}


def test_yaml_entry_with_relative_paths(coco_data, tmp_path, monkeypatch):
    json_file, image_root = coco_data["train"]
    monkeypatch.chdir(os.path.dirname(os.path.dirname(json_file)))
    cfg_file = tmp_path / "mine.yaml"
    cfg_file.write_text(
        f"_BASE_: {R18}\n"
        "DATASETS:\n"
        "  COCO: [['owncoco_yaml_train', 'train/annotations.json', 'train/images']]\n"
        "  TRAIN: ('owncoco_yaml_train',)\n"
        "  TEST: ()\n"
        "MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 3\n"
    )
    cfg = get_kd_cfg()
    cfg.merge_from_file(str(cfg_file))
    register_datasets_from_config(cfg)
    assert MetadataCatalog.get("owncoco_yaml_train").json_file == json_file  # made absolute
    assert len(DatasetCatalog.get("owncoco_yaml_train")) == 6


def test_missing_json_names_the_key_and_the_fix(coco_data, tmp_path):
    _, image_root = coco_data["train"]
    cfg = _cfg(*_entry_opts("owncoco_nojson", str(tmp_path / "nope.json"), image_root))
    with pytest.raises(FileNotFoundError) as e:
        register_datasets_from_config(cfg)
    msg = str(e.value)
    assert "DATASETS.COCO" in msg and "nope.json" in msg and "owncoco_nojson" in msg
    assert "second element" in msg


def test_missing_image_root_names_the_key_and_the_fix(coco_data, tmp_path):
    json_file, _ = coco_data["train"]
    cfg = _cfg(*_entry_opts("owncoco_noimages", json_file, str(tmp_path / "pictures")))
    with pytest.raises(FileNotFoundError, match=r"image root .*pictures.*third element"):
        register_datasets_from_config(cfg)


def test_category_count_must_match_num_classes(coco_data):
    json_file, image_root = coco_data["train"]
    cfg = _cfg(*_entry_opts("owncoco_wrongk", json_file, image_root, num_classes=12))
    with pytest.raises(ValueError) as e:
        register_datasets_from_config(cfg)
    msg = str(e.value)
    assert "3 categories [disc, bar, square]" in msg
    assert "MODEL.ROI_HEADS.NUM_CLASSES is 12" in msg and "MODEL.ROI_HEADS.NUM_CLASSES 3" in msg
    assert "owncoco_wrongk" not in DatasetCatalog.list()  # nothing half-registered


def test_malformed_entry_and_taken_name(coco_data):
    json_file, image_root = coco_data["train"]
    cfg = _cfg("DATASETS.COCO", json.dumps([["only_a_name", json_file]]))
    with pytest.raises(ValueError, match=r"\[name, json_file, image_root\].*DATASETS.COCO '"):
        register_datasets_from_config(cfg)
    cfg = _cfg("DATASETS.COCO", json.dumps([["coco_2017_val", json_file, image_root]]))
    with pytest.raises(ValueError, match="already registered .* another name"):
        register_datasets_from_config(cfg)


def test_train_net_trains_and_evaluates_on_own_coco_json(coco_data, tmp_path):
    (tj, ti), (vj, vi) = coco_data["train"], coco_data["val"]
    entries = [["owncoco_train", tj, ti], ["owncoco_val", vj, vi]]
    opts = tiny_overrides(tmp_path, max_iter=2) + [
        "DATASETS.COCO", json.dumps(entries),
        "DATASETS.TRAIN", "('owncoco_train',)",
        "DATASETS.TEST", "('owncoco_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    ]  # fmt: skip
    proc = run_tool(REPO, "train_net.py", ["--config-file", R18] + opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "final_results.json"))
    assert set(res["bbox"]) >= {"AP", "AP50", "AP-disc", "AP-bar", "AP-square"}
    # Predictions were written back with the json's own (gapped) category ids.
    preds = json.load(open(tmp_path / "inference" / "owncoco_val" / "coco_instances_results.json"))
    assert {p["category_id"] for p in preds} <= {1, 2, 5}
    saved = (tmp_path / "config.yaml").read_text()
    assert "owncoco_val" in saved and vj in saved  # the run's config records the data


def test_visualize_mix_reads_datasets_coco(coco_data, tmp_path):
    json_file, image_root = coco_data["train"]
    proc = run_tool(REPO, "visualize_mix.py",
                    ["--num", "2", "--output", tmp_path, "--type", "cutmix"]
                    + _entry_opts("owncoco_vis_train", json_file, image_root)
                    + ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["000_cutmix.png", "001_cutmix.png"]
