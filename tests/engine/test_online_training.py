"""Online distillation through the tools: 2-process CPU DDP training with the EMA hook,
--eval-all-peers, and export of one member to plain detectron2."""

import json
import os

import pytest
import torch

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.utils.testing import run_tool

ONLINE = os.path.join(CONFIGS, "Synthetic", "online_lite0_R18.yaml")


def _peer_opts():
    t = tiny_overrides("unused")
    return [x for k, v in zip(t[0::2], t[1::2]) if k.startswith("MODEL.") for x in (k, v)]


def _opts(out, root, max_iter=3, batch=4):
    return tiny_overrides(out, root, max_iter=max_iter, batch=batch) + [
        "MODEL.ONLINE_KD.PEER_OPTS", str(_peer_opts()),
        # Decay 0: after every step the EMA equals the peer, which shows the hook ran.
        "MODEL.ONLINE_KD.EMA_DECAY", "0.0",
        "MODEL.ONLINE_KD.EMA_WARMUP", "1",
        # Every term on from the start (the CPU config keeps the EMA terms off).
        "MODEL.ONLINE_KD.MUTUAL_WARMUP", "0",
        "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[1.0]",
        "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "1.0",
        "MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "1.0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("online_ddp")
    proc = run_tool(
        REPO,
        "train_net.py",
        ["--config-file", ONLINE, "--num-gpus", "2"] + _opts(out, synthetic_root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, synthetic_root


def test_two_process_cpu_ddp_online_distillation(ddp_run):
    out, _ = ddp_run
    ckpt = torch.load(out / "model_final.pth", weights_only=False)["model"]
    for i in range(2):
        peer = {k[len(f"peers.{i}.") :]: v for k, v in ckpt.items() if k.startswith(f"peers.{i}.")}
        ema = {
            k[len(f"ema_peers.{i}.") :]: v
            for k, v in ckpt.items()
            if k.startswith(f"ema_peers.{i}.")
        }
        assert peer and set(ema) == set(peer)
        for k, v in peer.items():  # the EMA hook ran after the last step (decay 0: a copy)
            assert torch.equal(ema[k], v), k
    metrics = [json.loads(x) for x in open(out / "metrics.json")]
    keys = set().union(*metrics)
    assert {"loss_peer0_cls", "loss_peer1_rpn_loc", "loss_kd_peer1_fpn_p2_from_peer0"} <= keys
    assert {"loss_kd_peer0_roi_cls_from_peer1", "loss_kd_peer1_ema_roi_cls"} <= keys


def test_eval_all_peers_reports_every_member(ddp_run, tmp_path):
    out, root = ddp_run
    proc = run_tool(
        REPO,
        "train_net.py",
        ["--config-file", ONLINE, "--eval-all-peers"]
        + _opts(tmp_path, root)
        + ["MODEL.WEIGHTS", str(out / "model_final.pth")],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "members_results.json"))
    assert list(res) == ["peer0", "peer1", "ema0", "ema1"]
    for member, r in res.items():
        assert "AP" in r["bbox"], member


def test_export_member_tool_gives_plain_detectron2(ddp_run, tmp_path):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    out, root = ddp_run
    export = tmp_path / "export"
    proc = run_tool(
        REPO,
        "export_student.py",
        ["--config-file", ONLINE, "--weights", str(out / "model_final.pth")]
        + ["--output", str(export), "--member", "ema1"]
        + _opts(tmp_path, root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain_cfg = get_cfg()  # the R18 peer: plain detectron2 keys only
    plain_cfg.merge_from_file(str(export / "config.yaml"))
    assert plain_cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert plain_cfg.INPUT.FORMAT == "BGR" and plain_cfg.MODEL.RESNETS.DEPTH == 18
    state = torch.load(export / "model_final.pth", weights_only=False)["model"]
    missing, unexpected = build_model(plain_cfg).load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
