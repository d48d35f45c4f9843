"""kd_det.utils.runs: a run is reused only when nothing that defines it changed."""

import json
import os

from conftest import REPO
from kd_det.utils import runs
from kd_det.utils.runs import STAMP, config_digest, finished_run


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_config_digest_follows_base_and_peers(tmp_path):
    base = _write(tmp_path / "Base.yaml", "SOLVER:\n  BASE_LR: 0.02\n")
    peer = _write(tmp_path / "peer.yaml", "_BASE_: Base.yaml\n")
    child = _write(
        tmp_path / "child.yaml",
        "_BASE_: Base.yaml\nMODEL:\n  ONLINE_KD:\n    PEERS: ['peer.yaml', 'peer.yaml']\n",
    )
    d0 = config_digest(child, str(tmp_path))
    assert d0 == config_digest(child, str(tmp_path))  # deterministic
    _write(tmp_path / "Base.yaml", "SOLVER:\n  BASE_LR: 0.01\n")  # an inherited file changed
    d1 = config_digest(child, str(tmp_path))
    assert d1 != d0
    _write(tmp_path / "peer.yaml", "_BASE_: Base.yaml\nSEED: 3\n")  # a peer's file changed
    assert config_digest(child, str(tmp_path)) != d1
    assert base and peer


def test_finished_run_needs_identical_params(tmp_path):
    (tmp_path / "final_results.json").write_text(json.dumps({"bbox": {"AP": 1.0}}))
    params = {"seed": 0, "config_digest": "abc"}
    (tmp_path / STAMP).write_text(json.dumps({"params": params, "seconds": 1.0}))
    assert finished_run(str(tmp_path), params)["seconds"] == 1.0
    assert finished_run(str(tmp_path), dict(params, config_digest="abd")) is None
    assert finished_run(str(tmp_path), dict(params, seed=1)) is None


def test_schedule_relative_keys_move_with_the_schedule(tmp_path):
    opts = ["MODEL.ONLINE_KD.EMA_WARMUP", "500", "MODEL.KD.WARMUP_ITERS", "100"]
    # Half of 1000 is half of 250; an absolute warm-up stays as it is.
    assert runs.rescale_schedule(opts, 1000, 250) == [
        "MODEL.ONLINE_KD.EMA_WARMUP", "125", "MODEL.KD.WARMUP_ITERS", "100"]  # fmt: skip
    cfg = tmp_path / "online.yaml"
    base = os.path.join(REPO, "configs", "Synthetic", "online_lite0_x2.yaml")
    cfg.write_text(f"_BASE_: {base}\nMODEL:\n  ONLINE_KD:\n    EMA_WARMUP: 150\n")
    # The config's own schedule is 300 iterations (Base-Synthetic.yaml): 150 of 300 -> 125 of 250.
    assert runs.schedule_relative_opts(str(cfg), 250) == ["MODEL.ONLINE_KD.EMA_WARMUP", "125"]
    # A config that leaves the key at its default gets no override.
    student = os.path.join(REPO, "configs", "Synthetic", "faster_rcnn_lite0_FPN.yaml")
    assert runs.schedule_relative_opts(student, 250) == []


def test_suite_runs_with_the_kernel_caps_of_the_demo_and_the_study():
    """The golden tests compare floats with ==: the suite caps kernels as kd_det.utils.runs does."""
    import torch
    from conftest import ISA_CAP

    assert ISA_CAP == runs.ISA_CAP
    # The cap holds in this process (torch was imported after conftest set it).
    assert torch.backends.cpu.get_cpu_capability() != "AVX512"
