"""The teacher check before the first step, and the teacher/student class-name check."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny teacher checkpoint (untrained: its AP is 0) and the overrides of its config."""
    d = tmp_path_factory.mktemp("check_teacher")
    t_opts = tiny_overrides(d) + ["MODEL.FPN.OUT_CHANNELS", "48"]
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(t_opts)
    torch.manual_seed(1)
    DetectionCheckpointer(build_model(cfg), save_dir=str(d)).save("model_final")
    return {"weights": str(d / "model_final.pth"), "opts": t_opts, "dir": d}


def _cfg(out, teacher_file, synthetic_root, *extra):
    from kd_det.data.builtin import register_datasets_from_config

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(out, synthetic_root, max_iter=1))
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "DistillationRCNN",
        "MODEL.KD.TEACHER.CONFIG_FILE", R18,
        "MODEL.KD.TEACHER.WEIGHTS", teacher_file["weights"],
        "MODEL.KD.TEACHER.OPTS", str(teacher_file["opts"]),
        "MODEL.KD.TEACHER.CHECK_IMAGES", "4",
    ] + list(extra))  # fmt: skip
    cfg.freeze()
    register_datasets_from_config(cfg)
    return cfg


def test_bad_teacher_stops_the_run_before_the_first_step(tmp_path, teacher_file, synthetic_root):
    from kd_det.engine import KDTrainer
    from kd_det.engine.teacher_check import TeacherCheckError

    cfg = _cfg(tmp_path, teacher_file, synthetic_root, "MODEL.KD.TEACHER.MIN_AP", "50.0")
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TeacherCheckError) as e:
        trainer.train()
    msg = str(e.value)
    assert "below MODEL.KD.TEACHER.MIN_AP 50.0" in msg
    assert "the first 4 images of 'synthetic_val'" in msg
    for cause in ("wrong checkpoint", teacher_file["weights"], "INPUT.FORMAT", "PIXEL_MEAN",
                  "label order", "--eval-teacher", "MODEL.KD.TEACHER.CHECK_IMAGES 0"):  # fmt: skip
        assert cause in msg
    # No step was taken: the student is unchanged and nothing was saved.
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, student_before[k]), k
    assert not os.path.exists(tmp_path / "model_final.pth")
    res = json.load(open(tmp_path / "teacher_check.json"))
    assert res["images"] == 4 and res["AP"] < 50 and res["seconds"] > 0


def test_floor_zero_logs_the_ap_and_trains(tmp_path, teacher_file, synthetic_root):
    from kd_det.engine import KDTrainer

    cfg = _cfg(tmp_path, teacher_file, synthetic_root, "MODEL.KD.TEACHER.MIN_AP", "0.0")
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert not trainer.model.teacher.training  # evaluation left the teacher in eval mode
    res = json.load(open(tmp_path / "teacher_check.json"))
    assert res["dataset"] == "synthetic_val" and res["images"] == 4 and "AP50" in res
    metrics = [json.loads(x) for x in open(tmp_path / "metrics.json")]
    assert any(m.get("teacher_check/AP") == pytest.approx(res["AP"]) for m in metrics)
    assert os.path.exists(tmp_path / "model_final.pth")


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["MODEL.KD.TEACHER.ALLOW_RANDOM", "True"], "random"),
        (["MODEL.KD.TEACHER.CHECK_IMAGES", "0"], "CHECK_IMAGES is 0"),
        (["DATASETS.TEST", "()"], "DATASETS.TEST is empty"),
    ],
)
def test_skipped_without_a_real_teacher_or_test_data(
    tmp_path, teacher_file, synthetic_root, extra, reason
):
    from kd_det.engine.teacher_check import skip_reason

    cfg = _cfg(tmp_path, teacher_file, synthetic_root, *extra)
    assert reason in skip_reason(cfg, build_model(cfg))


def test_skipped_on_resume(tmp_path, teacher_file, synthetic_root):
    from kd_det.engine.teacher_check import TeacherCheckHook

    cfg = _cfg(tmp_path, teacher_file, synthetic_root, "MODEL.KD.TEACHER.MIN_AP", "50.0")
    hook = TeacherCheckHook(cfg)
    hook.trainer = SimpleNamespace(start_iter=7, model=build_model(cfg))
    hook.before_train()  # would raise TeacherCheckError on a fresh start
    assert not os.path.exists(tmp_path / "teacher_check.json")


def test_teacher_trained_on_other_classes(tmp_path, teacher_file, synthetic_root):
    """The teacher's run record (config.yaml beside its weights, as train_net writes it) says it
    learned COCO's 80 classes; the student's data has the generator's 12."""
    from kd_det.engine.teacher_check import skip_reason

    teacher_dir = tmp_path / "teacher_run"
    teacher_dir.mkdir()
    weights = teacher_dir / "model_final.pth"
    weights.write_bytes(open(teacher_file["weights"], "rb").read())
    (teacher_dir / "config.yaml").write_text("DATASETS:\n  TRAIN: [coco_2017_train]\n")
    extra = ["MODEL.KD.TEACHER.WEIGHTS", str(weights)]
    with pytest.raises(ValueError) as e:
        build_model(_cfg(tmp_path, teacher_file, synthetic_root, *extra,
                         "MODEL.KD.ROI.CLS_WEIGHT", "1.0"))  # fmt: skip
    msg = str(e.value)
    assert "'coco_2017_train' (80 classes)" in msg and "'synthetic_train' (12 classes)" in msg
    assert "label 0 is 'person' for the teacher" in msg
    assert "MODEL.KD.ROI.CLS_WEIGHT 0" in msg and "config.yaml" in msg
    # Label-free terms only: distillation proceeds, but the teacher's AP is not checked.
    cfg = _cfg(tmp_path, teacher_file, synthetic_root, *extra)
    assert "other classes" in skip_reason(cfg, build_model(cfg))


def test_a_teacher_that_finds_nothing_scores_zero(tmp_path, teacher_file, synthetic_root):
    """COCOEvaluator reports NaN when nothing was predicted; the check must not read that as
    "no objects to judge" and let a teacher that detects nothing through."""
    from kd_det.engine.teacher_check import TeacherCheckError, check_teacher

    opts = teacher_file["opts"] + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.01"]
    cfg = _cfg(tmp_path, teacher_file, synthetic_root, "MODEL.KD.TEACHER.MIN_AP", "1.0",
               "MODEL.KD.TEACHER.OPTS", str(opts))  # fmt: skip
    with pytest.raises(TeacherCheckError, match="'synthetic_val' is 0.0, below"):
        check_teacher(cfg, build_model(cfg), str(tmp_path))
    res = json.load(open(tmp_path / "teacher_check.json"))
    assert res["detections"] == 0 and res["objects"] > 0 and res["AP"] == 0.0
