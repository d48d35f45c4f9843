"""A RetinaNet student through the trainer and the tools: KDTrainer trains DistillationRetinaNet
with its teacher check, the export gives a plain detectron2 RetinaNet with identical predictions,
and ``tools/train_net.py --eval-only`` evaluates the student without building the teacher."""

import json
import os

import torch
from detectron2.config import get_cfg
from detectron2.modeling import RetinaNet, build_model

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import random_batch, run_tool, save_random_detector

RETINA = os.path.join(CONFIGS, "Synthetic", "retinanet_R18_FPN.yaml")
SMALL_HEAD = ["MODEL.RETINANET.NUM_CONVS", "2"]


def test_retinanet_student_trains_exports_and_evaluates(tmp_path, synthetic_root, kd_log):
    from kd_det.data.builtin import register_datasets_from_config
    from kd_det.engine import KDTrainer
    from kd_det.export.student import export_student

    t_opts = tiny_overrides(tmp_path / "t") + SMALL_HEAD + ["MODEL.FPN.OUT_CHANNELS", "48"]
    teacher = save_random_detector(RETINA, tmp_path, t_opts, seed=3)
    run = tmp_path / "run"
    cfg = get_kd_cfg()
    cfg.merge_from_file(RETINA)
    cfg.merge_from_list(tiny_overrides(run, synthetic_root, max_iter=2) + SMALL_HEAD)
    cfg.merge_from_list([
        "MODEL.META_ARCHITECTURE", "DistillationRetinaNet",
        "MODEL.KD.TEACHER.CONFIG_FILE", RETINA,
        "MODEL.KD.TEACHER.WEIGHTS", teacher["path"],
        "MODEL.KD.TEACHER.OPTS", str(t_opts),
        "MODEL.KD.TEACHER.CHECK_IMAGES", "2",
        "MODEL.KD.TEACHER.MIN_AP", "0.0",  # a random teacher: the check only logs its AP
        "MODEL.KD.FEATURE.LOSS", "mse",
        "MODEL.KD.FEATURE.LEVELS", "['p3', 'p4', 'p5', 'p6', 'p7']",
        "MODEL.KD.DENSE.CLS_WEIGHT", "1.0",
    ])  # fmt: skip
    cfg.freeze()
    register_datasets_from_config(cfg)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (run / "teacher_check.json").exists()  # the teacher check ran for a RetinaNet pair
    metrics = [json.loads(x) for x in (run / "metrics.json").read_text().splitlines()]
    assert any("loss_kd_fpn_p7" in m and "loss_kd_dense_cls" in m for m in metrics)

    # Export: a plain detectron2 RetinaNet config and checkpoint, same predictions.
    export_student(cfg, str(run / "model_final.pth"), str(tmp_path / "export"))
    plain_cfg = get_cfg()
    plain_cfg.merge_from_file(str(tmp_path / "export" / "config.yaml"))
    assert plain_cfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    plain = build_model(plain_cfg).eval()
    assert type(plain) is RetinaNet
    state = torch.load(tmp_path / "export" / "model_final.pth", weights_only=True)["model"]
    assert plain.load_state_dict(state, strict=True) is not None
    student = trainer.model.eval()
    batch = [{"image": b["image"], "height": 64, "width": 64} for b in random_batch(2)]
    with torch.no_grad():
        for x, y in zip(student(batch), plain(batch)):
            assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)

    # --eval-only evaluates the student alone: the teacher's weights are not even needed.
    config = tmp_path / "distill.yaml"
    config.write_text(cfg.dump())
    args = [
        "--config-file", str(config), "--eval-only",
        "MODEL.WEIGHTS", str(run / "model_final.pth"),
        "MODEL.KD.TEACHER.WEIGHTS", str(tmp_path / "no_such_teacher.pth"),
        "OUTPUT_DIR", str(tmp_path / "eval"),
    ]  # fmt: skip
    proc = run_tool(REPO, "train_net.py", args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating the student as a RetinaNet" in proc.stdout + proc.stderr
    assert "AP" in json.loads((tmp_path / "eval" / "eval_results.json").read_text())["bbox"]
