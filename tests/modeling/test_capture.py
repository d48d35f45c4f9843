"""Taps instead of a forked training pass: DistillationRCNN runs GeneralizedRCNN.forward itself, so
``vis_period`` and precomputed proposals work, and a deep copy of a tapped model records into
itself."""

import copy
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.modeling.capture import pop_recorded, record_output
from kd_det.utils.testing import random_batch

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
KD = [
    "MODEL.META_ARCHITECTURE", "DistillationRCNN",
    "MODEL.KD.TEACHER.CONFIG_FILE", R18,
    "MODEL.KD.TEACHER.ALLOW_RANDOM", "True",
    "MODEL.KD.FEATURE.LOSS", "mse",
    "MODEL.KD.ROI.CLS_WEIGHT", "1.0",
    "MODEL.KD.ROI.BOX_WEIGHT", "1.0",
]  # fmt: skip


def _model(tmp_path, *extra):
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(tmp_path) + KD + list(extra))
    torch.manual_seed(0)
    return build_model(cfg).train()


def test_vis_period_draws_training_proposals(tmp_path):
    model = _model(tmp_path, "VIS_PERIOD", "1")
    with EventStorage() as storage:
        losses = model(random_batch())
    assert "loss_kd_roi_cls" in losses and "loss_kd_fpn_p2" in losses
    assert storage._vis_data, "GeneralizedRCNN.visualize_training did not run"


def test_precomputed_proposals_feed_the_roi_terms(tmp_path):
    model = _model(
        tmp_path,
        "MODEL.PROPOSAL_GENERATOR.NAME", "PrecomputedProposals",
        "MODEL.KD.TEACHER.OPTS", "['MODEL.PROPOSAL_GENERATOR.NAME', 'PrecomputedProposals']",
    )  # fmt: skip
    assert model.proposal_generator is None
    batch = random_batch(1)
    g = torch.Generator().manual_seed(3)
    for x in batch:
        p = Instances((64, 64))
        xy = torch.rand(20, 2, generator=g) * 40
        p.proposal_boxes = Boxes(torch.cat([xy, xy + 16], 1))
        p.objectness_logits = torch.rand(20, generator=g)
        x["proposals"] = p
    with EventStorage():
        losses = model(batch)
    assert "loss_rpn_cls" not in losses
    assert torch.isfinite(losses["loss_kd_roi_cls"]) and losses["loss_kd_roi_cls"] > 0
    sum(losses.values()).backward()


def test_deep_copy_records_into_itself():
    net = torch.nn.Linear(2, 2)
    record_output(net)
    twin = copy.deepcopy(net)
    x = torch.ones(1, 2)
    twin(x)
    assert pop_recorded(net) is None and pop_recorded(twin) is not None
    net(x)
    assert pop_recorded(net) is not None and pop_recorded(net) is None


def test_rpn_terms_without_an_rpn_are_refused(tmp_path):
    with pytest.raises(ValueError, match="RPN distillation needs an RPN in both models"):
        _model(
            tmp_path,
            "MODEL.PROPOSAL_GENERATOR.NAME", "PrecomputedProposals",
            "MODEL.KD.RPN.OBJECTNESS_WEIGHT", "1.0",
        )  # fmt: skip
