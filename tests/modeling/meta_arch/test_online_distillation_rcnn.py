"""OnlineDistillationRCNN on tiny CPU peers: each peer alone when knowledge is off, EMA update rule,
label-space check, adapters, every term, checkpoint/resume and member selection for inference
(member export: tests/export/test_members.py)."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.modeling.common import convert_input_format
from kd_det.export.members import member_cfg, member_state_dict
from kd_det.utils.testing import model_overrides, perturb_online_peers, random_batch

ONLINE = os.path.join(CONFIGS, "Synthetic", "online_lite0_R18.yaml")
LITE0 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite0_FPN.yaml")
R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
KNOWLEDGE_OFF = [
    "MODEL.ONLINE_KD.FEATURE_WEIGHTS", "[0.0]",
    "MODEL.ONLINE_KD.LOGIT_WEIGHT", "0.0",
    "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[0.0]",
    "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "0.0",
    "MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "0.0",
]  # fmt: skip


# Every mutual and EMA term at weight 1 from the first iteration (the CPU config ramps the mutual
# terms in and keeps the EMA terms off; these tests exercise all of them).
EVERY_TERM_ON = [
    "MODEL.ONLINE_KD.MUTUAL_WARMUP", "0",
    "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[1.0]",
    "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "1.0",
    "MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "1.0",
]  # fmt: skip


def _cfg(tmp_path, *extra, peers=(LITE0, R18), peer_opts=()):
    cfg = get_kd_cfg()
    cfg.merge_from_file(ONLINE)
    cfg.merge_from_list(tiny_overrides(tmp_path))
    cfg.merge_from_list(
        [
            "MODEL.ONLINE_KD.PEERS", str(list(peers)),
            "MODEL.ONLINE_KD.PEER_OPTS", str(model_overrides(*peer_opts)),
            "MODEL.ONLINE_KD.EMA_WARMUP", "0",
        ]  # fmt: skip
        + EVERY_TERM_ON
        + list(extra)
    )
    return cfg


def _flip(batch):
    return convert_input_format(batch, "BGR", "RGB")


@pytest.fixture(scope="module")
def lite0_pair(tmp_path_factory):
    """Two Lite0 peers, EMA decay 0.9, ``INFERENCE ema1`` (shared by the tests below, in order)."""
    d = tmp_path_factory.mktemp("lite0_pair")
    args = ["MODEL.ONLINE_KD.EMA_DECAY", "0.9", "MODEL.ONLINE_KD.INFERENCE", "ema1"]
    cfg = _cfg(d, *args, peers=(LITE0, LITE0))
    torch.manual_seed(1)
    return cfg, build_model(cfg)


@pytest.fixture(scope="module")
def online_model(tmp_path_factory):
    """Two Lite0 peers (RGB; the loader gives BGR) with FPN 32 and 48, every term on."""
    d = tmp_path_factory.mktemp("online")
    cfg = _cfg(d, peer_opts=["peer1:MODEL.FPN.OUT_CHANNELS", "48"], peers=(LITE0, LITE0))
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_knowledge_off_each_peer_trains_exactly_like_alone(tmp_path):
    cfg = _cfg(tmp_path, *KNOWLEDGE_OFF)
    torch.manual_seed(0)
    online = build_model(cfg)
    assert len(online.kd_adapters) == 0
    plains = []
    for i in range(2):
        plain = build_model(member_cfg(cfg, f"peer{i}"))
        assert type(plain) is GeneralizedRCNN
        plain.load_state_dict(member_state_dict(online.state_dict(), f"peer{i}"))
        plain.train()
        plains.append(plain)
    batch = random_batch()
    online.train()
    torch.manual_seed(7)
    with EventStorage():
        losses = online(batch)
        sum(losses.values()).backward()
    # Alone, in the same order of random draws: peer0 (RGB: flipped input), then peer1.
    torch.manual_seed(7)
    with EventStorage():
        alone = [plains[0](_flip(batch)), plains[1](batch)]
        for ls in alone:
            sum(ls.values()).backward()
    expected = {f"loss_peer{i}_{k[5:]}": v for i, ls in enumerate(alone) for k, v in ls.items()}
    assert set(losses) == set(expected)
    for k, v in expected.items():
        assert torch.equal(losses[k], v), k
    for i, plain in enumerate(plains):
        grads = dict(plain.named_parameters())
        for name, p in online.peers[i].named_parameters():
            if grads[name].grad is None:
                assert p.grad is None, name
            else:
                assert torch.equal(p.grad, grads[name].grad), name


def test_every_enabled_term_appears_and_is_finite(online_model):
    cfg, model = online_model
    # Different FPN widths (32 vs 48): one adapter per direction and level.
    levels = ["p2", "p3", "p4", "p5", "p6"]
    assert set(model.kd_adapters) == {
        f"p{i}_to_p{j}_{lvl}" for i, j in ((0, 1), (1, 0)) for lvl in levels
    }
    assert model.kd_adapters["p0_to_p1_p3"].weight.shape[:2] == (48, 32)
    model.train()
    model.zero_grad()
    with EventStorage():
        losses = model(random_batch(1))
        sum(losses.values()).backward()
    expected = set()
    for i, j in ((0, 1), (1, 0)):
        expected |= {f"loss_peer{i}_{k}" for k in ("cls", "box_reg", "rpn_cls", "rpn_loc")}
        expected |= {f"loss_kd_peer{i}_fpn_{lvl}_from_peer{j}" for lvl in levels}
        expected |= {f"loss_kd_peer{i}_ema_fpn_{lvl}" for lvl in levels}
        expected |= {f"loss_kd_peer{i}_roi_cls_from_peer{j}"}
        expected |= {f"loss_kd_peer{i}_ema_roi_cls", f"loss_kd_peer{i}_ema_roi_box"}
    assert set(losses) == expected
    for k, v in losses.items():
        assert torch.isfinite(v) and v.dtype == torch.float32, k
    assert losses["loss_kd_peer0_roi_cls_from_peer1"] > 0
    assert losses["loss_kd_peer1_ema_roi_box"] > 0
    assert all(p.grad is not None for p in model.kd_adapters.parameters())
    # EMA teachers: not parameters, in eval mode, saved in the state dict.
    params = {id(p) for p in model.parameters()}
    assert not any(id(b) in params for b in model.ema_peers.buffers())
    assert list(model.ema_peers.parameters()) == []
    assert not any(m.training for m in model.ema_peers.modules())
    assert any(k.startswith("ema_peers.1.backbone.") for k in model.state_dict())


def test_zero_weight_terms_skipped_and_average_target_and_ema_warmup(tmp_path, caplog):
    cfg = _cfg(
        tmp_path,
        "MODEL.ONLINE_KD.FEATURE_WEIGHTS", "[0.0]",
        "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[0.0, 1.0, 0.0, 0.0, 0.0]",
        "MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "0.0",
        "MODEL.ONLINE_KD.LOGIT_TARGET", "average",
        "MODEL.ONLINE_KD.EMA_WARMUP", "3",
        peers=(R18, R18),
    )  # fmt: skip
    model = build_model(cfg).train()
    batch = random_batch(2)
    with EventStorage(start_iter=2):
        early = model(batch)
    with EventStorage(start_iter=3):
        late = model(batch)
    assert "EMA teachers were never updated" in caplog.text  # no update_ema() in this loop
    kd = {k for k in early if k.startswith("loss_kd_")}
    assert kd == {"loss_kd_peer0_roi_cls_from_peers", "loss_kd_peer1_roi_cls_from_peers"}
    assert {k for k in late if k.startswith("loss_kd_")} == kd | {
        "loss_kd_peer0_ema_fpn_p3", "loss_kd_peer1_ema_fpn_p3",
        "loss_kd_peer0_ema_roi_cls", "loss_kd_peer1_ema_roi_cls",
    }  # fmt: skip


def test_different_label_spaces_are_refused(tmp_path):
    cfg = _cfg(tmp_path, peer_opts=["peer1:MODEL.ROI_HEADS.NUM_CLASSES", "5"])
    with pytest.raises(ValueError, match=r"peer0 .* predicts 12 classes and peer1 .* predicts 5"):
        build_model(cfg)
    cfg = _cfg(tmp_path, "MODEL.ROI_HEADS.NUM_CLASSES", "5")
    with pytest.raises(ValueError, match="NUM_CLASSES 5 but the peers predict 12"):
        build_model(cfg)


def test_bad_member_names_and_single_peer_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'ema2' is not a member"):
        build_model(_cfg(tmp_path, "MODEL.ONLINE_KD.INFERENCE", "ema2", peers=(R18, R18)))
    with pytest.raises(ValueError, match="'ema0' is not a member"):
        build_model(
            _cfg(
                tmp_path,
                *KNOWLEDGE_OFF,
                "MODEL.ONLINE_KD.INFERENCE",
                "ema0",
                "MODEL.ONLINE_KD.EMA_ENABLED",
                "False",
            )
        )
    with pytest.raises(ValueError, match="two or more"):
        build_model(_cfg(tmp_path, peers=(R18,)))


def test_inference_config_key_selects_member(lite0_pair):
    _, model = lite0_pair
    model.eval()
    assert model.inference_member == "ema1"
    perturb_online_peers(model)  # peers now differ from their EMA copies
    batch = [{"image": b["image"], "height": 64, "width": 64} for b in random_batch(5)]
    with torch.no_grad():
        got = model(batch)[0]["instances"]
        want = model.ema_peers[1](_flip(batch))[0]["instances"]  # Lite0 reads RGB
        other = model.peers[1](_flip(batch))[0]["instances"]
    assert torch.equal(got.scores, want.scores)
    assert len(other) != len(got) or not torch.equal(other.scores, got.scores)
    model.train()


def test_ema_update_follows_its_formula(lite0_pair):
    _, model = lite0_pair
    before = {k: v.clone() for k, v in model.ema_peers.state_dict().items()}
    perturb_online_peers(model, seed=5)
    with torch.no_grad():  # BN statistics move too, as they do in training
        for peer in model.peers:
            for name, b in peer.named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    b.add_(0.5)
    updates = int(model.ema_updates)
    model.update_ema()
    assert int(model.ema_updates) == updates + 1
    ema = model.ema_peers.state_dict()
    for i, peer in enumerate(model.peers):
        params = dict(peer.named_parameters())
        for name, b in peer.state_dict().items():
            key = f"{i}.{name}"
            if name in params:  # w_ema = d * w_ema + (1 - d) * w
                want = 0.9 * before[key] + 0.1 * params[name].detach()
                assert torch.allclose(ema[key], want, rtol=1e-6, atol=1e-7), key
                assert not torch.equal(ema[key], before[key]), key
            elif b.is_floating_point():  # BN statistics are averaged like the weights
                want = 0.9 * before[key] + 0.1 * b
                assert torch.allclose(ema[key], want, rtol=1e-6, atol=1e-7), key
                if name.endswith("running_mean"):
                    assert not torch.equal(ema[key], before[key]), key
            else:  # counters are copied
                assert torch.equal(ema[key], b), key


def test_checkpoint_restores_peers_and_ema(tmp_path, lite0_pair):
    cfg, model = lite0_pair
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    torch.manual_seed(2)
    fresh = build_model(cfg)
    w = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(fresh.peers[0].state_dict()[w], model.peers[0].state_dict()[w])
    DetectionCheckpointer(fresh).load(str(tmp_path / "ckpt.pth"))
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert set(saved) == set(loaded)
    assert any(k.startswith("ema_peers.1.") for k in saved)
    for k, v in saved.items():
        assert torch.equal(v, loaded[k]), k
    # A checkpoint without EMA weights initialises each EMA from the loaded peer.
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("ema_peers.")}
    torch.save(ckpt, tmp_path / "no_ema.pth")
    DetectionCheckpointer(fresh).load(str(tmp_path / "no_ema.pth"))
    for i in range(2):
        peer_state = fresh.peers[i].state_dict()
        for k, v in fresh.ema_peers[i].state_dict().items():
            assert torch.equal(v, peer_state[k]), k


def test_mutual_warmup_ramps_the_mutual_weights_linearly(tmp_path):
    cfg = _cfg(tmp_path, "MODEL.ONLINE_KD.MUTUAL_WARMUP", "4", peers=(R18, R18))
    cfg.merge_from_list(
        ["MODEL.ONLINE_KD.FEATURE_WEIGHTS", "[2.0]", "MODEL.ONLINE_KD.LOGIT_WEIGHT", "3.0"]
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = random_batch(2)
    got = {}
    for it in (0, 2, 4, 8):
        torch.manual_seed(1)  # the same proposals are sampled at every iteration
        with EventStorage(start_iter=it):
            got[it] = model(batch)
    assert model.mutual_warmup == 4
    for name in ("loss_kd_peer0_fpn_p3_from_peer1", "loss_kd_peer1_roi_cls_from_peer0"):
        full = got[4][name]
        assert full > 0, name
        # min(1, (iter + 1) / 4), the rule of every distillation warm-up
        assert torch.allclose(got[0][name], 0.25 * full, rtol=1e-5), name
        assert torch.allclose(got[2][name], 0.75 * full, rtol=1e-5), name
        assert torch.allclose(got[8][name], full, rtol=1e-5), name
    # Detection losses are not ramped.
    assert torch.allclose(got[0]["loss_peer0_cls"], got[4]["loss_peer0_cls"], rtol=1e-5)
