"""Fault injection: ``--resume`` with a changed config, and ``--resume`` with nothing to resume.

A changed key that alters the model, its losses or its training data is refused with the keys
named (``--allow-config-change`` resumes and logs it); schedule changes are allowed and logged;
the run's previous ``config.yaml`` is kept whenever anything changed. A resume into a folder
without a checkpoint warns, naming the folder.
"""

import os

import pytest

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.engine.resume_check import ResumeConfigError, check_resume_config
from kd_det.utils.testing import run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def _cfg(out, *extra):
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(out) + list(extra))
    return cfg


def _saved_run(out, *extra):
    """OUTPUT_DIR with the config.yaml detectron2's default_setup writes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(_cfg(out, *extra).dump())
    return (out / "config.yaml").read_bytes()


#: (key, value) changes that alter the model, its losses or its training data
MODEL_CHANGES = [
    ("MODEL.KD.FEATURE.LOSS", "mse"),
    ("MODEL.ROI_HEADS.NUM_CLASSES", "5"),
    ("MODEL.FPN.OUT_CHANNELS", "48"),
    ("INPUT.MIN_SIZE_TRAIN", "(96,)"),
    ("INPUT.MIX.ENABLED", "True"),
    ("DATASETS.TRAIN", "('synthetic2_train',)"),
]
#: changes of the schedule or the machinery
SCHEDULE_CHANGES = [
    ("SOLVER.MAX_ITER", "20"),
    ("SOLVER.BASE_LR", "0.001"),
    ("TEST.EVAL_PERIOD", "5"),
    ("DATALOADER.NUM_WORKERS", "2"),
    ("KD_TRAINER.MAX_TO_KEEP", "1"),
    ("MODEL.WEIGHTS", "other_init.pth"),
    ("MODEL.KD.TEACHER.CHECK_IMAGES", "0"),
    ("DATASETS.SYNTHETIC_ROOT", "/elsewhere/synthetic"),
]


@pytest.mark.parametrize("key,value", MODEL_CHANGES, ids=[k for k, _ in MODEL_CHANGES])
def test_resume_refuses_a_change_of_the_model_naming_the_key(tmp_path, key, value):
    out = tmp_path / "run"
    before = _saved_run(out)
    with pytest.raises(ResumeConfigError) as info:
        check_resume_config(_cfg(out, key, value), defaults=get_kd_cfg())
    msg = str(info.value)
    assert f"  - {key}: " in msg and "--allow-config-change" in msg
    assert f"--config-file {out / 'config.yaml'}" in msg
    assert msg.count("\n  - ") == 1  # only the changed key
    assert (out / "config.yaml").read_bytes() == before
    assert os.listdir(out) == ["config.yaml"]


@pytest.mark.parametrize("key,value", SCHEDULE_CHANGES, ids=[k for k, _ in SCHEDULE_CHANGES])
def test_resume_allows_and_logs_a_schedule_change(tmp_path, key, value):
    out = tmp_path / "run"
    before = _saved_run(out)
    lines = check_resume_config(_cfg(out, key, value), defaults=get_kd_cfg())
    assert len(lines) == 1 and lines[0].startswith("--resume: schedule and setup keys differ")
    assert f"  - {key}: " in lines[0]
    kept = [n for n in os.listdir(out) if n.startswith("config.yaml.bak-")]
    assert len(kept) == 1 and (out / kept[0]).read_bytes() == before
    assert kept[0] in lines[0]


def test_allow_config_change_resumes_and_logs_the_model_change(tmp_path):
    out = tmp_path / "run"
    _saved_run(out)
    cfg = _cfg(out, "MODEL.KD.FEATURE.LOSS", "mse", "SOLVER.MAX_ITER", "9")
    lines = check_resume_config(cfg, allow_change=True, defaults=get_kd_cfg())
    assert lines[0].startswith("--resume with --allow-config-change")
    assert "MODEL.KD.FEATURE.LOSS: 'ssim' -> 'mse'" in lines[0]
    assert "SOLVER.MAX_ITER: 2 -> 9" in lines[1]


def test_nothing_changed_or_nothing_saved(tmp_path):
    out = tmp_path / "run"
    assert check_resume_config(_cfg(out), defaults=get_kd_cfg()) == []  # no config.yaml yet
    _saved_run(out)
    assert check_resume_config(_cfg(out), defaults=get_kd_cfg()) == []
    assert os.listdir(out) == ["config.yaml"]


def test_a_key_a_newer_kd_det_added_counts_only_when_set(tmp_path):
    """A config.yaml written before a key existed: the key's default is no change."""
    import yaml

    out = tmp_path / "run"
    _saved_run(out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["MODEL"]["KD"]["SSIM"]["TERMS"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_resume_config(_cfg(out), defaults=get_kd_cfg()) == []
    with pytest.raises(ResumeConfigError, match=r"MODEL.KD.SSIM.TERMS: \(not in the saved config"):
        check_resume_config(_cfg(out, "MODEL.KD.SSIM.TERMS", "structure"), defaults=get_kd_cfg())


def test_train_net_resume_with_a_changed_loss_is_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    before = _saved_run(out)
    args = ["--config-file", R18, "--resume"] + tiny_overrides(out)
    proc = run_tool(REPO, "train_net.py", args + ["MODEL.KD.FEATURE.LOSS", "mse"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "MODEL.KD.FEATURE.LOSS: 'ssim' -> 'mse'" in proc.stderr
    assert (out / "config.yaml").read_bytes() == before
    assert "log.txt" not in os.listdir(out)


def test_resume_without_a_checkpoint_warns_naming_the_folder(tmp_path, synthetic_root, kd_log):
    from kd_det.data.builtin import register_datasets_from_config
    from kd_det.engine import KDTrainer

    out = tmp_path / "never_trained"
    cfg = _cfg(out, *tiny_overrides(out, synthetic_root)[-6:], "DATASETS.TEST", "()")
    cfg.freeze()
    register_datasets_from_config(cfg)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
    assert f"--resume: OUTPUT_DIR '{out}' holds no checkpoint" in kd_log.text
