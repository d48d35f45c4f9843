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


#: Offline distillation meta-architectures (a teacher config and weights).
OFFLINE = ("DistillationRCNN", "DistillationRetinaNet")


@pytest.mark.parametrize("path", RUNNABLE, ids=[os.path.relpath(p, CONFIGS) for p in RUNNABLE])
def test_config_builds_and_trains_one_step(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # teacher config paths are relative to the repository root
    cfg = get_kd_cfg()
    cfg.merge_from_file(path)
    opts = tiny_overrides(tmp_path) + ["MODEL.WEIGHTS", ""]
    if cfg.MODEL.META_ARCHITECTURE in OFFLINE:
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
    # A RetinaNet (plain or distilled) has its own class count and no RPN losses.
    retina = "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
    heads = cfg.MODEL.RETINANET if retina else cfg.MODEL.ROI_HEADS
    with EventStorage():
        losses = model(random_batch(num_classes=heads.NUM_CLASSES))
    detection = {"loss_cls", "loss_box_reg"}
    if not retina:
        detection |= {"loss_rpn_cls", "loss_rpn_loc"}
    if online:  # every peer's own losses, renamed loss_peer<i>_*
        n = len(cfg.MODEL.ONLINE_KD.PEERS)
        detection = {f"loss_peer{i}_{k[5:]}" for i in range(n) for k in detection}
    assert detection <= set(losses)
    if cfg.MODEL.META_ARCHITECTURE in OFFLINE + ("OnlineDistillationRCNN",):
        assert any(k.startswith("loss_kd_") for k in losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


COCO_RUNNABLE = [p for p in RUNNABLE if os.sep + "COCO-Distillation" + os.sep in p]


def _load(path):
    cfg = get_kd_cfg()
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize(
    "path", COCO_RUNNABLE, ids=[os.path.relpath(p, CONFIGS) for p in COCO_RUNNABLE]
)
def test_coco_configs_are_resumable_amp_and_check_headers(path):
    """Every COCO config uses kd_det's resumable loader (a fixed SEED), AMP, and header-only image
    checks (a full decode of COCO costs minutes per start); peers' own files are not runs."""
    if os.sep + "peers" + os.sep in path or os.sep + "teachers" + os.sep in path:
        pytest.skip("a peer's or teacher's own config, read by a distillation config")
    cfg = _load(path)
    from kd_det.engine.trainer import _why_not_resumable

    assert cfg.SEED >= 0 and _why_not_resumable(cfg) == ""
    assert cfg.SOLVER.AMP.ENABLED
    assert cfg.KD_TRAINER.CHECK_IMAGES == "header"


def test_coco_ssim_configs_use_the_ssim_kd_papers_setting():
    """Per-level min-max, 11x11 window, sigma 1.5, K (0.01, 0.03), (1 - SSIM) / 2, lambda 3."""
    ssim = [
        p
        for p in COCO_RUNNABLE
        if _load(p).MODEL.META_ARCHITECTURE in OFFLINE
        and _load(p).MODEL.KD.FEATURE.LOSS == "ssim"
        and any(_load(p).MODEL.KD.FEATURE.WEIGHTS)  # head-only configs keep the base's loss name
    ]
    assert len(ssim) >= 5 and any("retinanet" in os.path.basename(p) for p in ssim)
    for path in ssim:
        kd = _load(path).MODEL.KD
        got = (kd.FEATURE.RANGE_POLICY, kd.SSIM.WINDOW_SIZE, kd.SSIM.SIGMA, list(kd.SSIM.K))
        assert got == ("minmax", 11, 1.5, [0.01, 0.03]), path
        assert (kd.SSIM.LOSS_FORM, list(kd.FEATURE.WEIGHTS)) == ("(1-ssim)/2", [3.0]), path


def test_coco_multilevel_carries_the_studys_tuned_recipe():
    """The COCO multi-level config has the knowledge keys of the study's tuned multi-level config
    (its model-size keys, FPN width and FC dim, stay the COCO models')."""
    coco_file = "faster_rcnn_R101_to_R50_FPN_1x_multilevel.yaml"
    coco = _load(os.path.join(CONFIGS, "COCO-Distillation", coco_file)).MODEL.KD
    tuned = _load(os.path.join(CONFIGS, "Synthetic", "tuned", "multilevel.yaml")).MODEL.KD
    keys = ("FEATURE.LOSS", "FEATURE.WEIGHTS", "FEATURE.LEVELS", "BACKBONE.LEVELS",
            "BACKBONE.WEIGHTS", "RPN.OBJECTNESS_WEIGHT", "RPN.DELTAS_WEIGHT", "ROI.CLS_WEIGHT",
            "ROI.TEMPERATURE", "ROI.BOX_WEIGHT", "HINT_WEIGHTING")  # fmt: skip
    for key in keys:
        a, b = coco, tuned
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key
