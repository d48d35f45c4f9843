"""check_lazy_resume_config: --resume of a LazyConfig run checks what it resumes, as the YAML
check does (that one is tested as the user meets it in test_fault_injection_resume.py)."""

import os

import pytest
from detectron2.config import LazyConfig

from conftest import CONFIGS
from kd_det.engine.resume_check import (
    ResumeConfigError,
    check_lazy_resume_config,
    is_lazy_model_key,
)

LAZY_DISTILL = os.path.join(CONFIGS, "Synthetic", "lazy", "distill_retinanet_R18_mse.py")


def _cfg(out, *overrides):
    cfg = LazyConfig.load(LAZY_DISTILL)
    return LazyConfig.apply_overrides(cfg, [f"train.output_dir={out}"] + list(overrides))


def _saved(out, *overrides):
    """A run's folder as detectron2's default_setup leaves it: config.yaml of its config."""
    os.makedirs(out, exist_ok=True)
    LazyConfig.save(_cfg(out, *overrides), os.path.join(out, "config.yaml"))


def test_model_keys_are_the_model_and_its_training_data():
    assert is_lazy_model_key("model.kd.FEATURE.LOSS")
    assert is_lazy_model_key("dataloader.train.mapper.augmentations")
    for key in ("train.max_iter", "optimizer.lr", "dataloader.test.dataset.names",
                "dataloader.train.num_workers", "model.kd.TEACHER.MIN_AP"):  # fmt: skip
        assert not is_lazy_model_key(key), key


def test_same_config_resumes_silently(tmp_path):
    _saved(tmp_path)
    assert check_lazy_resume_config(_cfg(tmp_path)) == []
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # nothing set aside
    assert check_lazy_resume_config(_cfg(tmp_path / "fresh")) == []  # no saved config: a start


def test_a_changed_loss_is_refused_naming_the_key_and_the_fix(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ResumeConfigError) as e:
        check_lazy_resume_config(_cfg(tmp_path, "model.kd.FEATURE.LOSS=pkd"))
    msg = str(e.value)
    assert "model.kd.FEATURE.LOSS: 'mse' -> 'pkd'" in msg
    assert f"train.output_dir '{tmp_path}'" in msg and "--allow-config-change" in msg
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]
    # With consent: resumed, the change logged and the old config kept aside.
    lines = check_lazy_resume_config(_cfg(tmp_path, "model.kd.FEATURE.LOSS=pkd"), True)
    assert any("model.kd.FEATURE.LOSS" in line for line in lines)
    assert any(n.startswith("config.yaml.bak-") for n in os.listdir(tmp_path))


def test_a_longer_schedule_is_allowed_and_logged(tmp_path):
    _saved(tmp_path)
    lines = check_lazy_resume_config(_cfg(tmp_path, "train.max_iter=9000"))
    assert len(lines) == 1 and "schedule and setup keys" in lines[0]
    assert "train.max_iter" in lines[0] and "9000" in lines[0]


def test_python_tags_in_the_saved_config_are_read_as_data_never_run(tmp_path):
    """LazyConfig.save writes ShapeSpec objects with Python tags (the same config resumes
    silently above); a tag that would run code is compared as data: a changed model, refused."""
    marker = tmp_path / "marker"
    (tmp_path / "config.yaml").write_text(
        f"model: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(ResumeConfigError, match="model"):
        check_lazy_resume_config(_cfg(tmp_path))
    assert not marker.exists()
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    lines = check_lazy_resume_config(_cfg(tmp_path))
    assert len(lines) == 1 and "was not compared" in lines[0]
