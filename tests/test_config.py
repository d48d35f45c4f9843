"""kd_det's config keys and every YAML under configs/."""

import glob
import os

import pytest

from conftest import CONFIGS
from kd_det.config import add_kd_config, get_kd_cfg

ALL_YAMLS = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True))


def test_add_kd_config_adds_keys_with_defaults():
    from detectron2.config import get_cfg

    cfg = add_kd_config(get_cfg())
    assert cfg.INPUT.MIX.ENABLED is False
    assert cfg.MODEL.EFFICIENTNET.NAME == "efficientnet-lite0"
    assert cfg.KD_TRAINER.FIND_UNUSED_PARAMETERS is False


def test_every_key_has_a_comment():
    """add_kd_config documents each key on the line above it."""
    import inspect

    from kd_det import config

    lines = inspect.getsource(config.add_kd_config).splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("_C.") and "= CN()" not in s:
            assert lines[i - 1].strip().startswith("#"), f"undocumented key: {s}"


def test_unknown_key_in_yaml_fails_with_detectron2_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("INPUT:\n  MIX:\n    ENABLE: True\n")  # typo of ENABLED
    cfg = get_kd_cfg()
    with pytest.raises(KeyError, match="Non-existent config key: INPUT.MIX.ENABLE"):
        cfg.merge_from_file(str(bad))


@pytest.mark.parametrize("path", ALL_YAMLS, ids=[os.path.relpath(p, CONFIGS) for p in ALL_YAMLS])
def test_every_yaml_loads(path):
    cfg = get_kd_cfg()
    cfg.merge_from_file(path)
    assert cfg.MODEL.META_ARCHITECTURE
