"""tools/lazyconfig_train_net.py as a user runs it: a LazyConfig RetinaNet student wrapped by
``distill``, with a LazyConfig teacher, is checked like a YAML run's teacher, trains two steps on
tiny generated data, logs its ``loss_kd_*`` terms, evaluates, and leaves a checkpoint that plain
detectron2 loads."""

import json
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

from conftest import CONFIGS, REPO
from kd_det.utils.testing import run_tool

LAZY_RETINA = os.path.join("configs", "Synthetic", "lazy", "retinanet_R18_FPN.py")
LAZY_DISTILL = os.path.join("configs", "Synthetic", "lazy", "distill_retinanet_R18_mse.py")


def _args(tmp_path, synthetic_root, out, *extra):
    """The tool's arguments for the LazyConfig distillation with an untrained (AP 0) teacher."""
    torch.manual_seed(11)
    teacher = instantiate(LazyConfig.load(os.path.join(REPO, LAZY_RETINA)).model)
    DetectionCheckpointer(teacher, save_dir=str(tmp_path)).save("teacher")
    return [
        "--config-file", LAZY_DISTILL,
        f"model.kd.TEACHER.CONFIG_FILE={LAZY_RETINA}",
        f"model.kd.TEACHER.WEIGHTS={tmp_path / 'teacher.pth'}",
        "model.kd.DENSE.CLS_WEIGHT=1.0", "model.kd.TEACHER.CHECK_IMAGES=4",
        f"datasets.SYNTHETIC_ROOT={synthetic_root}",
        "input_size.min_size=64", "input_size.max_size=96",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "train.max_iter=2", "train.log_period=1", f"train.output_dir={out}",
    ] + list(extra)  # fmt: skip


def test_lazy_distillation_stops_on_a_useless_teacher(tmp_path, synthetic_root):
    """The teacher check of tools/train_net.py applies to a LazyConfig run: an untrained teacher
    stops it before the first step, with the check's message, and nothing is saved."""
    out = tmp_path / "run"
    # --resume on a first start (as pre-emption scripts pass it): said, then a fresh start.
    args = ["--resume"] + _args(tmp_path, synthetic_root, out)
    proc = run_tool(REPO, "lazyconfig_train_net.py", args)
    assert proc.returncode != 0
    assert f"--resume: train.output_dir '{out}' holds no checkpoint" in proc.stdout + proc.stderr
    assert "TeacherCheckError" in proc.stderr
    assert "below MODEL.KD.TEACHER.MIN_AP 5.0" in proc.stderr
    assert "the first 4 images of 'synthetic_val'" in proc.stderr
    assert json.loads((out / "teacher_check.json").read_text())["images"] == 4
    assert not (out / "model_final.pth").exists()


def test_lazy_student_and_teacher_train_evaluate_and_export(tmp_path, synthetic_root):
    out = tmp_path / "run"
    # Floor 0: the check only logs the untrained teacher's AP, and training goes on.
    args = _args(tmp_path, synthetic_root, out, "model.kd.TEACHER.MIN_AP=0.0")
    proc = run_tool(REPO, "lazyconfig_train_net.py", args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "teacher_check.json").read_text())["dataset"] == "synthetic_val"
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any("teacher_check/seconds" in x for x in lines)
    trained = [x for x in lines if "loss_cls" in x]
    assert trained[-1]["iteration"] == 1
    assert {"loss_kd_fpn_p3", "loss_kd_fpn_p7", "loss_kd_dense_cls"} <= set(trained[-1])
    assert any("bbox/AP" in x for x in lines)  # the final evaluation ran
    # The student's checkpoint loads into the plain LazyConfig RetinaNet, every key used.
    plain = instantiate(LazyConfig.load(os.path.join(CONFIGS, "Synthetic", "lazy",
                                                     "retinanet_R18_FPN.py")).model)  # fmt: skip
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []  # 64 channels both: no adapters

    # --resume checks what it resumes: another hint loss is refused before anything starts ...
    before = (out / "model_final.pth").read_bytes()
    proc = run_tool(
        REPO, "lazyconfig_train_net.py", ["--resume"] + args + ["model.kd.FEATURE.LOSS=pkd"]
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.kd.FEATURE.LOSS: 'mse' -> 'pkd'" in proc.stderr
    assert (out / "model_final.pth").read_bytes() == before
    # ... a longer schedule resumes at the saved iteration, and the change is logged.
    proc = run_tool(REPO, "lazyconfig_train_net.py", ["--resume"] + args + ["train.max_iter=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "schedule and setup keys differ" in log and "train.max_iter: 2 -> 3" in log
    rows = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    # One more step, at iteration 2, and the teacher not checked again on resume.
    assert [r["iteration"] for r in rows if "loss_cls" in r] == [0, 1, 2]
    assert sum("teacher_check/AP" in r for r in rows) == 1


def test_one_lazy_run_per_output_dir(tmp_path, synthetic_root):
    """A second run into a folder a live run holds stops before it starts, naming the holder and
    the LazyConfig key to change, as tools/train_net.py does for OUTPUT_DIR."""
    from kd_det.engine.run_lock import OutputDirLock

    out = tmp_path / "run"
    with OutputDirLock(str(out)):  # this test process is the live run
        proc = run_tool(REPO, "lazyconfig_train_net.py", _args(tmp_path, synthetic_root, out))
    assert proc.returncode != 0
    assert f"train.output_dir '{out}' is in use by a live run (pid {os.getpid()}" in proc.stderr
    assert "give this one another train.output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".kd_det_run.lock"]


def test_a_flag_after_the_overrides_is_named_with_the_fix(tmp_path, synthetic_root):
    args = _args(tmp_path, synthetic_root, tmp_path / "run") + ["--resume"]
    proc = run_tool(REPO, "lazyconfig_train_net.py", args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "an override is not key=value" in proc.stderr and "go before them" in proc.stderr
