"""Distillation through the trainer and the tools: teacher isolation over real training steps with
periodic evaluation, CPU DDP, --eval-teacher, and export to plain detectron2."""

import json
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


@pytest.fixture(scope="module")
def kd_setup(tmp_path_factory, synthetic_root):
    """A tiny saved teacher and the KD overrides that use it (student FPN 32 ch, teacher 48)."""
    d = tmp_path_factory.mktemp("kd_teacher")
    t_opts = tiny_overrides(d) + ["MODEL.FPN.OUT_CHANNELS", "48"]
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(t_opts)
    torch.manual_seed(1)
    DetectionCheckpointer(build_model(cfg), save_dir=str(d)).save("teacher")
    kd_opts = [
        "MODEL.META_ARCHITECTURE", "DistillationRCNN",
        "MODEL.KD.TEACHER.CONFIG_FILE", R18,
        "MODEL.KD.TEACHER.WEIGHTS", str(d / "teacher.pth"),
        "MODEL.KD.TEACHER.ALLOW_RANDOM", "True",  # a random teacher: no teacher check
        "MODEL.KD.TEACHER.OPTS", str(t_opts),
        "MODEL.KD.BACKBONE.LEVELS", "['res2']",
        "MODEL.KD.ROI.CLS_WEIGHT", "1.0",
    ]  # fmt: skip
    return {"teacher": str(d / "teacher.pth"), "opts": kd_opts, "root": synthetic_root}


def _cfg(out, kd_setup, *extra, max_iter=4):
    from kd_det.data.builtin import register_datasets_from_config

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(out, kd_setup["root"], max_iter) + kd_setup["opts"])
    cfg.merge_from_list(list(extra))
    cfg.freeze()
    register_datasets_from_config(cfg)
    return cfg


def test_teacher_untouched_by_training_with_periodic_evaluation(tmp_path, kd_setup):
    from kd_det.engine import KDTrainer

    cfg = _cfg(tmp_path, kd_setup, "TEST.EVAL_PERIOD", "2")
    trainer = KDTrainer(cfg)
    teacher = trainer.model.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in teacher.parameters())
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert not teacher.training and trainer.model.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [
        k for k, v in trainer.model.state_dict().items() if not torch.equal(v, student_before[k])
    ]
    assert any(k.startswith("kd_adapters.") for k in changed) and any(
        "backbone" in k for k in changed
    )
    # Evaluation ran during training (periodic) and the KD terms were logged.
    metrics = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.json"))]
    assert any("bbox/AP" in m for m in metrics)
    assert any("loss_kd_fpn_p2" in m and "loss_kd_roi_cls" in m for m in metrics)
    ckpt = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    assert not any("teacher" in k for k in ckpt["model"])


def test_two_process_cpu_ddp_distillation(tmp_path, kd_setup):
    proc = run_tool(
        REPO,
        "train_net.py",
        ["--config-file", R18, "--num-gpus", "2"]
        + tiny_overrides(tmp_path, kd_setup["root"], max_iter=3, batch=4)
        + kd_setup["opts"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(tmp_path / "model_final.pth")
    metrics = [json.loads(x) for x in open(tmp_path / "metrics.json")]
    assert any("loss_kd_backbone_res2" in m for m in metrics)


def test_eval_teacher_uses_the_students_evaluator(tmp_path, kd_setup):
    args = ["--config-file", R18, "--eval-teacher"]
    proc = run_tool(
        REPO, "train_net.py", args + tiny_overrides(tmp_path, kd_setup["root"]) + kd_setup["opts"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "teacher_results.json"))
    assert "AP" in res["bbox"]


def test_export_gives_plain_detectron2_with_identical_predictions(tmp_path, kd_setup):
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    cfg = _cfg(tmp_path / "train", kd_setup, max_iter=2)
    model = build_model(cfg)
    with torch.no_grad():  # make the adapters non-trivial so dropping them is visible
        for p in model.kd_adapters.parameters():
            p.add_(0.1)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("student")
    out = tmp_path / "export"
    opts = tiny_overrides(tmp_path / "train", kd_setup["root"]) + kd_setup["opts"]
    proc = run_tool(
        REPO,
        "export_student.py",
        ["--config-file", R18, "--weights", str(tmp_path / "student.pth"), "--output", str(out)]
        + opts,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Plain detectron2: its own get_cfg (no kd_det keys) loads the exported config.
    plain_cfg = get_cfg()
    plain_cfg.merge_from_file(str(out / "config.yaml"))
    assert plain_cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    exported = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert not any(k.startswith("kd_adapters") for k in exported)
    plain_model = build_model(plain_cfg)
    missing, unexpected = plain_model.load_state_dict(exported, strict=False)
    assert missing == [] and unexpected == []

    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    kd_cfg = cfg.clone()
    kd_cfg.defrost()
    kd_cfg.MODEL.WEIGHTS = str(tmp_path / "student.pth")
    ref = DefaultPredictor(kd_cfg)(image)["instances"]
    got = DefaultPredictor(plain_cfg)(image)["instances"]
    assert len(got) == len(ref)
    assert torch.equal(got.pred_boxes.tensor, ref.pred_boxes.tensor)
    assert torch.equal(got.scores, ref.scores)
