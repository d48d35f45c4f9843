"""Pieces offline and online distillation share: the warm-up rule, per-level weights, input
format conversion, sub-model configs."""

import os

import pytest
import torch
from detectron2.utils.events import EventStorage

from conftest import CONFIGS
from kd_det.modeling.common import (
    build_sub_model_cfg,
    convert_input_format,
    linear_warmup,
    per_level_weights,
)
from kd_det.utils.testing import random_batch

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def test_one_warmup_rule():
    assert [linear_warmup(4, it) for it in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert linear_warmup(0, 0) == 1.0 and linear_warmup(-1, 5) == 1.0
    with EventStorage(start_iter=1):
        assert linear_warmup(4) == 0.5  # the current iteration by default


def test_per_level_weights_broadcast_or_one_per_level():
    assert per_level_weights([2], ["p2", "p3"], "K") == {"p2": 2.0, "p3": 2.0}
    assert per_level_weights([1, 3], ["p2", "p3"], "K") == {"p2": 1.0, "p3": 3.0}
    assert per_level_weights([1], [], "K") == {}
    with pytest.raises(ValueError, match="K has 2 values for 3 levels"):
        per_level_weights([1, 2], ["p2", "p3", "p4"], "K")


def test_rgb_bgr_is_the_only_conversion():
    batch = random_batch()
    assert convert_input_format(batch, "BGR", "BGR") is batch
    flipped = convert_input_format(batch, "BGR", "RGB")
    assert torch.equal(flipped[1]["image"], batch[1]["image"][[2, 1, 0]])
    assert flipped[1]["instances"] is batch[1]["instances"]
    with pytest.raises(ValueError, match="only RGB<->BGR"):
        convert_input_format(batch, "BGR", "L")


def test_sub_model_config_is_a_plain_detector_on_the_runs_device(tmp_path):
    kwargs = dict(what="Peer config file", key="PEERS[0]", not_plain_hint="fix it.")
    sub = build_sub_model_cfg(R18, ["MODEL.FPN.OUT_CHANNELS", "48"], "cpu", **kwargs)
    assert sub.MODEL.FPN.OUT_CHANNELS == 48 and sub.MODEL.DEVICE == "cpu"
    with pytest.raises(FileNotFoundError, match="Peer config file '/no.yaml' \\(PEERS\\[0\\]\\)"):
        build_sub_model_cfg("/no.yaml", [], "cpu", **kwargs)
    online = os.path.join(CONFIGS, "Synthetic", "online_lite0_x2.yaml")
    with pytest.raises(ValueError, match="itself a distillation model.*fix it"):
        build_sub_model_cfg(online, [], "cpu", **kwargs)
