"""Stand-in weights (kd_det/utils/stand_in.py): calibrated FrozenBN norms output standardized
channels, for the student, a distillation model's teacher, and online peers with their EMA."""

import os

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.stand_in import calibrate_model, random_inputs

COCO = os.path.join(CONFIGS, "COCO-Distillation")


def _norm_outputs(detector, inputs):
    outs = []
    handles = [
        m.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))  # before ReLU_
        for m in detector.backbone.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    with torch.no_grad():
        detector.backbone(detector.preprocess_image(inputs).tensor)
    for h in handles:
        h.remove()
    return outs


def test_calibrated_frozen_bn_outputs_are_standardized(tmp_path):
    """Random FrozenBN ResNets (model-zoo configs) blow activations up; after calibration every
    frozen norm of the student and of the teacher outputs mean 0, std 1 per channel."""
    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(COCO, "faster_rcnn_R101_to_R50_FPN_1x_ssim.yaml"))
    cfg.merge_from_list(tiny_overrides(tmp_path) + ["MODEL.WEIGHTS", "", "MODEL.KD.TEACHER.WEIGHTS",
                        "", "MODEL.KD.TEACHER.ALLOW_RANDOM", "True"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = random_inputs(2, 64, 96, 80)
    raw = _norm_outputs(model, inputs)
    assert max(float(o.abs().max()) for o in raw) > 1e3  # what makes fp16 overflow
    count = calibrate_model(model, inputs)
    assert count > 100  # R50 student and R101 teacher
    for detector in (model, model.teacher):
        for out in _norm_outputs(detector, inputs):
            mean, std = out.mean(dim=(0, 2, 3)), out.std(dim=(0, 2, 3))
            torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-3, rtol=0)
            torch.testing.assert_close(std, torch.ones_like(std), atol=2e-3, rtol=0)


def test_online_peers_and_their_ema_copies_are_calibrated(tmp_path):
    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(COCO, "online_R50_R18_FPN_1x.yaml"))
    peer_opts = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]
    cfg.merge_from_list(
        tiny_overrides(tmp_path) + ["MODEL.ONLINE_KD.LOAD_PEER_WEIGHTS", "False",
                                    "MODEL.ONLINE_KD.PEER_OPTS", str(peer_opts)]  # fmt: skip
    )
    model = build_model(cfg)
    assert calibrate_model(model, random_inputs(2, 64, 64, 80)) > 0
    for peer, ema in zip(model.peers, model.ema_peers):
        for k, v in peer.state_dict().items():
            assert torch.equal(ema.state_dict()[k], v), k
