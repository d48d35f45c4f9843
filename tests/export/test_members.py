"""Exporting one member of an online run (a peer or an EMA teacher) as a plain detectron2 detector
that predicts exactly what the member predicted inside the online model."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.modeling.common import convert_input_format
from kd_det.export.student import export_student
from kd_det.export.members import member_state_dict
from kd_det.utils.testing import model_overrides, perturb_online_peers, random_batch

ONLINE = os.path.join(CONFIGS, "Synthetic", "online_lite0_R18.yaml")
LITE0 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite0_FPN.yaml")


@pytest.fixture(scope="module")
def online_model(tmp_path_factory):
    """Two Lite0 peers (RGB; the loader gives BGR) with FPN 32 and 48, EMA teachers on."""
    cfg = get_kd_cfg()
    cfg.merge_from_file(ONLINE)
    cfg.merge_from_list(tiny_overrides(tmp_path_factory.mktemp("online")))
    cfg.merge_from_list(
        [
            "MODEL.ONLINE_KD.PEERS", str([LITE0, LITE0]),
            "MODEL.ONLINE_KD.PEER_OPTS", str(model_overrides("peer1:MODEL.FPN.OUT_CHANNELS", "48")),
            "MODEL.ONLINE_KD.EMA_WARMUP", "0",
        ]  # fmt: skip
    )
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_export_of_each_member_is_a_plain_detector_with_identical_predictions(
    tmp_path, online_model
):
    cfg, model = online_model
    perturb_online_peers(model, seed=11)
    model.update_ema()  # EMA now differs from the peers
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("online")
    batch = [{"image": b["image"], "height": 64, "width": 64} for b in random_batch(4)]
    model.eval()
    ckpt = torch.load(tmp_path / "online.pth", weights_only=False)["model"]
    # Full export (tool path) of a peer and an EMA teacher; the other two members' weights are
    # checked in the plain detector of the same architecture (export = these stripped keys).
    for member, twin in (("peer0", "ema0"), ("ema1", "peer1")):
        out = tmp_path / member
        export_student(cfg, str(tmp_path / "online.pth"), str(out), member=member)
        plain_cfg = get_kd_cfg()  # Lite0 needs kd_det keys (R18: tests/engine/test_online_training)
        plain_cfg.merge_from_file(str(out / "config.yaml"))
        assert plain_cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        plain = build_model(plain_cfg).eval()
        state = torch.load(out / "model_final.pth", weights_only=False)["model"]
        for name, weights in ((member, state), (twin, member_state_dict(ckpt, twin))):
            missing, unexpected = plain.load_state_dict(weights, strict=False)
            assert missing == [] and unexpected == [], name
            model.set_inference_member(name)  # what MODEL.ONLINE_KD.INFERENCE sets
            inputs = (
                convert_input_format(batch, "BGR", "RGB")
                if plain_cfg.INPUT.FORMAT == "RGB"
                else batch
            )
            with torch.no_grad():
                got, ref = plain(inputs), model(batch)
            for x, y in zip(got, ref):
                assert torch.equal(
                    x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor
                ), name
                assert torch.equal(x["instances"].scores, y["instances"].scores), name
    model.set_inference_member("peer0")
    model.train()
