"""Every runnable YAML under configs/ builds (random weights, nothing downloaded) and runs one
training step at tiny size on CPU, COCO/GPU configs included."""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import random_batch

RUNNABLE = sorted(
    p
    for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base")
)


@pytest.mark.parametrize("path", RUNNABLE, ids=[os.path.relpath(p, CONFIGS) for p in RUNNABLE])
def test_config_builds_and_trains_one_step(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # teacher config paths are relative to the repository root
    cfg = get_kd_cfg()
    cfg.merge_from_file(path)
    opts = tiny_overrides(tmp_path) + ["MODEL.WEIGHTS", ""]
    if cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN":
        opts += ["MODEL.KD.TEACHER.WEIGHTS", "", "MODEL.KD.TEACHER.ALLOW_RANDOM", "True"]
    online = cfg.MODEL.META_ARCHITECTURE == "OnlineDistillationRCNN"
    if online:
        # Peers are built from their own files: give them the tiny MODEL.* overrides too, and
        # skip their own init weights (ImageNet .pkl downloads).
        peer_opts = [
            x for k, v in zip(opts[0::2], opts[1::2]) if k.startswith("MODEL.") for x in (k, v)
        ]
        opts += [
            "MODEL.ONLINE_KD.PEER_OPTS", str(peer_opts),
            "MODEL.ONLINE_KD.LOAD_PEER_WEIGHTS", "False",
        ]  # fmt: skip
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(random_batch(num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES))
    detection = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    if online:  # every peer's own losses, renamed loss_peer<i>_*
        n = len(cfg.MODEL.ONLINE_KD.PEERS)
        detection = {f"loss_peer{i}_{k[5:]}" for i in range(n) for k in detection}
    assert detection <= set(losses)
    if cfg.MODEL.META_ARCHITECTURE in ("DistillationRCNN", "OnlineDistillationRCNN"):
        assert any(k.startswith("loss_kd_") for k in losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
