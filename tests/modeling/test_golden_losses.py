"""Golden values: every loss term and a checksum of the final weights of tiny distillation models.

The values in ``golden/losses.json`` were recorded from the code before the modeling package was
restructured (issue 14); any refactoring of the training pass, the distillation terms, the warm-up
or the EMA must reproduce them exactly (``==`` on floats, not a tolerance). Regenerate only for an
intended change of numbers: ``KD_DET_WRITE_GOLDEN=1 pytest tests/modeling/test_golden_losses.py``.
"""

import json
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import model_overrides, random_batch

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "losses.json")
R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
LITE0 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite0_FPN.yaml")
ONLINE = os.path.join(CONFIGS, "Synthetic", "online_lite0_R18.yaml")
STEPS = 3

# A random teacher (FPN 48 channels, so the 32-channel student needs adapters) reading RGB, so the
# student's BGR inputs are flipped for it.
TEACHER = [
    "MODEL.META_ARCHITECTURE", "DistillationRCNN",
    "MODEL.KD.TEACHER.CONFIG_FILE", R18,
    "MODEL.KD.TEACHER.ALLOW_RANDOM", "True",
    "MODEL.KD.TEACHER.OPTS", str(["MODEL.FPN.OUT_CHANNELS", "48", "INPUT.FORMAT", "RGB"]),
]  # fmt: skip
MULTILEVEL = [
    "MODEL.KD.FEATURE.WEIGHTS", "[1.0]",
    "MODEL.KD.FEATURE.FOREGROUND_WEIGHT", "2.0",
    "MODEL.KD.BACKBONE.LEVELS", "['res2']",
    "MODEL.KD.RPN.OBJECTNESS_WEIGHT", "1.0",
    "MODEL.KD.RPN.DELTAS_WEIGHT", "1.0",
    "MODEL.KD.ROI.CLS_WEIGHT", "1.0",
    "MODEL.KD.ROI.BOX_WEIGHT", "1.0",
]  # fmt: skip
CASES = {
    "offline_ssim": TEACHER + ["MODEL.KD.FEATURE.LOSS", "ssim", "MODEL.KD.WARMUP_ITERS", "4"],
    "offline_multilevel": TEACHER + MULTILEVEL + ["MODEL.KD.WARMUP_ITERS", "2"],
    "offline_dynamic": TEACHER
    + MULTILEVEL
    + ["MODEL.KD.HINT_WEIGHTING", "dynamic", "MODEL.KD.HINT.META_PERIOD", "1"],
    "online_every_term": [
        "MODEL.ONLINE_KD.MUTUAL_WARMUP", "0",
        "MODEL.ONLINE_KD.EMA_WARMUP", "0",
        "MODEL.ONLINE_KD.EMA_DECAY", "0.5",
        "MODEL.ONLINE_KD.EMA_FEATURE_WEIGHTS", "[1.0]",
        "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "1.0",
        "MODEL.ONLINE_KD.EMA_BOX_WEIGHT", "1.0",
    ],
    "online_mutual_warmup": [
        "MODEL.ONLINE_KD.MUTUAL_WARMUP", "4",
        "MODEL.ONLINE_KD.LOGIT_TARGET", "average",
        "MODEL.ONLINE_KD.EMA_WARMUP", "1",
        "MODEL.ONLINE_KD.EMA_LOGIT_WEIGHT", "1.0",
        "MODEL.ONLINE_KD.EMA_LOGIT_TARGET", "own",
    ],
}  # fmt: skip


def _cfg(tmp_path, name):
    cfg = get_kd_cfg()
    opts = tiny_overrides(tmp_path)
    if name.startswith("online"):
        cfg.merge_from_file(ONLINE)
        peer_opts = model_overrides("MODEL.EFFICIENTNET.PRETRAINED", "False")
        opts += ["MODEL.ONLINE_KD.PEERS", str([LITE0, R18])]
        opts += ["MODEL.ONLINE_KD.PEER_OPTS", str(peer_opts)]
    else:
        cfg.merge_from_file(R18)
    cfg.merge_from_list(opts + CASES[name])
    return cfg


def run_case(tmp_path, name):
    """Build with seed 0, train ``STEPS`` SGD steps on fixed random batches (ROI sampling seeded
    per step); returns every loss value per step and per-tensor float64 sums of the final state."""
    cfg = _cfg(tmp_path, name)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    steps = []
    for it in range(STEPS):
        torch.manual_seed(100 + it)
        with EventStorage(start_iter=it) as storage:
            storage.iter = it
            losses = model(random_batch(seed=it))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
        if hasattr(model, "update_ema"):
            model.update_ema()
        steps.append({k: float(v) for k, v in sorted(losses.items())})
    checksum = {
        k: float(v.detach().double().sum())
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }
    return {"losses": steps, "state_sums": checksum}


@pytest.fixture(scope="module")
def golden():
    if os.environ.get("KD_DET_WRITE_GOLDEN") or not os.path.isfile(GOLDEN):
        return None
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_and_weights_equal_golden(tmp_path, golden, name):
    got = run_case(tmp_path, name)
    if golden is None:
        data = {}
        if os.path.isfile(GOLDEN):
            with open(GOLDEN) as f:
                data = json.load(f)
        data[name] = got
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        pytest.skip(f"golden values of {name} written")
    want = golden[name]
    assert len(got["losses"]) == len(want["losses"])
    for it, (g, w) in enumerate(zip(got["losses"], want["losses"])):
        assert g == w, f"step {it}: {sorted(k for k in w if g.get(k) != w[k])}"
    assert got["state_sums"] == want["state_sums"], sorted(
        k for k in want["state_sums"] if got["state_sums"].get(k) != want["state_sums"][k]
    )
