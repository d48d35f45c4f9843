"""Fault injection: files whose loading would run code, at every place kd_det reads one.

Each payload would create a marker file when unpickled (``.pth``, ``.pkl``) or parsed unsafely
(a YAML ``!!python`` tag). Every case asserts that the marker does not appear and that the refusal
names the file. Dataset names that would make evaluation write outside ``OUTPUT_DIR`` are refused
before use. Library entry points run in-process on tiny models; each command-line tool once, in a
subprocess, as a user runs it.
"""

import os

import pytest
import torch
from torch import nn

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.checkpoint import UnsafeFileError
from kd_det.config import ConfigFileError, get_kd_cfg
from kd_det.utils.testing import run_tool, write_code_payloads

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


@pytest.fixture
def payloads(tmp_path):
    marker = tmp_path / "marker"
    paths = write_code_payloads(tmp_path / "payloads", marker)
    yield paths
    assert not marker.exists(), "a payload ran"


def _refused(exc_info, path):
    assert os.path.basename(path) in str(exc_info.value), str(exc_info.value)


# ------------------------------------------------------------------------------------------------
# weights: trainer (MODEL.WEIGHTS, --resume), teacher, peers, export, deploy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["pkl", "pth"])
def test_model_weights_are_read_as_data(tmp_path, payloads, ext):
    from kd_det.engine.checkpoint import AtomicDetectionCheckpointer

    ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(tmp_path / "out"))
    with pytest.raises(UnsafeFileError) as info:
        ckpt.resume_or_load(payloads[ext], resume=False)
    _refused(info, payloads[ext])


def test_resume_skips_a_checkpoint_that_asks_for_code(tmp_path, payloads, kd_log):
    """A crafted model_final.pth in OUTPUT_DIR is not loaded: --resume falls back to the newest
    checkpoint that loads as data, and the log names the refused file."""
    from kd_det.engine.checkpoint import AtomicDetectionCheckpointer, atomic_torch_save

    out = tmp_path / "out"
    out.mkdir()
    atomic_torch_save({"model": {"weight": torch.ones(2, 3), "bias": torch.ones(2)},
                       "iteration": 1}, str(out / "model_0000001.pth"))  # fmt: skip
    os.replace(payloads["pth"], out / "model_final.pth")
    (out / "last_checkpoint").write_text("model_final.pth")
    extra = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(out)).resume_or_load(
        "", resume=True
    )
    assert extra["iteration"] == 1
    assert "model_final.pth cannot be loaded (UnsafeFileError" in kd_log.text


@pytest.mark.parametrize("ext", ["pkl", "pth"])
def test_teacher_weights_are_read_as_data(payloads, ext):
    from kd_det.modeling.teacher import TeacherLoadError, load_teacher_weights

    with pytest.raises(TeacherLoadError, match="MODEL.KD.TEACHER.WEIGHTS") as info:
        load_teacher_weights(nn.Linear(3, 2), payloads[ext])
    _refused(info, payloads[ext])


def test_peer_weights_are_read_as_data(payloads):
    from kd_det.modeling.online.peers import load_peer_weights

    with pytest.raises(UnsafeFileError) as info:
        load_peer_weights(nn.Linear(3, 2), payloads["pkl"], 0)
    _refused(info, payloads["pkl"])


def test_export_reads_weights_as_data(tmp_path, payloads):
    from kd_det.export.student import ExportError, export_student

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path))
    with pytest.raises(ExportError, match="Nothing was written") as info:
        export_student(cfg, payloads["pth"], str(tmp_path / "export"), config_file=R18)
    _refused(info, payloads["pth"])
    assert not os.listdir(tmp_path / "export")


def test_deploy_reads_config_and_weights_as_data(tmp_path, payloads):
    from kd_det.export.deploy import load_student

    with pytest.raises(ConfigFileError) as info:
        load_student(payloads["yaml"], payloads["pth"])
    _refused(info, payloads["yaml"])
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path))
    (tmp_path / "config.yaml").write_text(cfg.dump())
    with pytest.raises(UnsafeFileError) as info:
        load_student(str(tmp_path / "config.yaml"), payloads["pth"])
    _refused(info, payloads["pth"])


# ------------------------------------------------------------------------------------------------
# config YAML: the teacher's and the peers' files
# ------------------------------------------------------------------------------------------------


def test_teacher_and_peer_configs_are_read_as_data(tmp_path, payloads):
    from kd_det.modeling.online.peers import build_peer_cfg
    from kd_det.modeling.teacher import build_teacher_cfg

    cfg = get_kd_cfg()
    cfg.merge_from_list(["MODEL.KD.TEACHER.CONFIG_FILE", payloads["yaml"]])
    cfg.merge_from_list(["MODEL.ONLINE_KD.PEERS", f"['{R18}', '{payloads['yaml']}']"])
    for build in (lambda: build_teacher_cfg(cfg), lambda: build_peer_cfg(cfg, 1)):
        with pytest.raises(ConfigFileError, match="safe YAML loader") as info:
            build()
        _refused(info, payloads["yaml"])


# ------------------------------------------------------------------------------------------------
# dataset names become path parts of OUTPUT_DIR/inference/<name>
# ------------------------------------------------------------------------------------------------

ESCAPING_NAMES = ["../../../../escaped_ds", "..", "a/b", "/abs/name", "back\\slash"]


@pytest.mark.parametrize("name", ESCAPING_NAMES, ids=lambda n: repr(n))
def test_dataset_names_that_leave_output_dir_are_refused(tmp_path, synthetic_root, name):
    from kd_det.data.builtin import register_datasets_from_config
    from kd_det.engine import KDTrainer

    images = os.path.join(synthetic_root, "val")
    coco = get_kd_cfg()
    coco.merge_from_list(tiny_overrides(tmp_path / "out"))
    coco.DATASETS.COCO = [[name, os.path.join(synthetic_root, "val.json"), images]]
    with pytest.raises(ValueError, match=r"DATASETS.COCO entry 0: the dataset name .* cannot be"):
        register_datasets_from_config(coco)
    test = get_kd_cfg()
    test.merge_from_list(tiny_overrides(tmp_path / "out"))
    test.DATASETS.TEST = (name,)
    with pytest.raises(ValueError, match=r"DATASETS.TEST: the dataset name .* cannot be used"):
        register_datasets_from_config(test)
    with pytest.raises(ValueError, match="one plain path component"):
        KDTrainer.build_evaluator(test, name)
    assert not (tmp_path / "escaped_ds").exists()


# ------------------------------------------------------------------------------------------------
# the command-line tools, as a user runs them
# ------------------------------------------------------------------------------------------------


def _clean_refusal(proc, path):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert os.path.basename(path) in proc.stderr, proc.stderr[-2000:]


def test_train_net_refuses_a_config_with_code(tmp_path, payloads):
    proc = run_tool(REPO, "train_net.py", ["--config-file", payloads["yaml"]]
                    + tiny_overrides(tmp_path / "out"))  # fmt: skip
    _clean_refusal(proc, payloads["yaml"])
    assert "safe YAML loader" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_compare_predictions_reads_weights_as_data(tmp_path, synthetic_root, payloads):
    args = ["--student-config", R18, "--student-weights", payloads["pkl"],
            "--num-images", "1", "--output", str(tmp_path / "grid.png")]  # fmt: skip
    proc = run_tool(REPO, "compare_predictions.py", args + tiny_overrides(tmp_path, synthetic_root))
    _clean_refusal(proc, payloads["pkl"])
    assert not (tmp_path / "grid.png").exists()


def test_trace_student_reads_weights_as_data(tmp_path, synthetic_root, payloads):
    export = tmp_path / "export"
    export.mkdir()
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path))
    (export / "config.yaml").write_text(cfg.dump())
    os.replace(payloads["pth"], export / "model_final.pth")
    image = sorted(os.listdir(os.path.join(synthetic_root, "val")))[0]
    args = ["--export-dir", str(export), "--image", os.path.join(synthetic_root, "val", image)]
    proc = run_tool(REPO, "trace_student.py", args)
    _clean_refusal(proc, str(export / "model_final.pth"))
    assert not (export / "model.ts").exists()


def test_export_student_refuses_a_config_with_code(tmp_path, payloads):
    args = ["--config-file", payloads["yaml"], "--weights", payloads["pth"],
            "--output", str(tmp_path / "export")]  # fmt: skip
    proc = run_tool(REPO, "export_student.py", args)
    _clean_refusal(proc, payloads["yaml"])
    assert not (tmp_path / "export").exists()
