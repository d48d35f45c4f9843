"""KDTrainer end to end on tiny generated data: train, evaluate, DDP on CPU, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.utils.testing import run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def _setup_cfg(opts):
    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config

    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(opts)
    cfg.freeze()
    register_datasets_from_config(cfg)
    return cfg


def test_train_and_evaluate_in_process(tmp_path, synthetic_root):
    from kd_det.engine import KDTrainer

    cfg = _setup_cfg(tiny_overrides(tmp_path, synthetic_root, max_iter=3))
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert os.path.exists(tmp_path / "model_final.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    lines = [json.loads(x) for x in (tmp_path / "metrics.json").read_text().splitlines()]
    train_lines = [x for x in lines if "loss_cls" in x]
    assert train_lines[-1]["iteration"] == 2  # iterations 0..2

    res = KDTrainer.test(cfg, trainer.model)
    assert set(res["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_missing_dataset_root_names_the_fix(tmp_path):
    opts = tiny_overrides(tmp_path, tmp_path / "nowhere")
    opts[opts.index("DATASETS.TRAIN") + 1] = "('synthetic_nowhere_train',)"
    opts[opts.index("DATASETS.TEST") + 1] = "('synthetic_nowhere_val',)"
    with pytest.raises(FileNotFoundError, match="make_synthetic_coco.py"):
        _setup_cfg(opts)


def test_missing_image_stops_before_training(tmp_path, synthetic_root):
    import shutil

    from kd_det.engine import KDTrainer

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "train").iterdir())[0]
    victim.unlink()
    opts = tiny_overrides(tmp_path / "out", root)
    opts[opts.index("DATASETS.TRAIN") + 1] = "('synthetic_missing_train',)"
    opts[opts.index("DATASETS.TEST") + 1] = "('synthetic_missing_val',)"
    cfg = _setup_cfg(opts)
    with pytest.raises(FileNotFoundError, match=victim.name):
        KDTrainer(cfg)


def test_two_process_cpu_ddp(tmp_path, synthetic_root):
    out = tmp_path / "ddp"
    proc = run_tool(
        REPO,
        "train_net.py",
        ["--config-file", R18, "--num-gpus", "2"]
        + tiny_overrides(out, synthetic_root, max_iter=3, batch=4)
        + ["KD_TRAINER.FIND_UNUSED_PARAMETERS", "True"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DistributedDataParallel" in proc.stdout + proc.stderr
    assert os.path.exists(out / "model_final.pth")


def test_killed_training_resumes_from_last_complete_checkpoint(tmp_path, synthetic_root):
    out = tmp_path / "resume"
    opts = tiny_overrides(out, synthetic_root, max_iter=40) + ["SOLVER.CHECKPOINT_PERIOD", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, TRAIN_NET, "--config-file", R18] + opts,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    try:
        while not (out / "model_0000003.pth").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tagged = (out / "last_checkpoint").read_text()
    assert tagged.startswith("model_") and not tagged.startswith("model_final")
    done_iter = int(tagged[len("model_") : -len(".pth")])

    proc = run_tool(REPO, "train_net.py", ["--config-file", R18, "--resume"] + opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert f"Starting training from iteration {done_iter + 1}" in log
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


def test_unreadable_image_stops_before_training(tmp_path, synthetic_root):
    import shutil

    from kd_det.engine import KDTrainer

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = sorted((root / "train").iterdir())[1]
    victim.write_bytes(b"this is not a jpeg")
    opts = tiny_overrides(tmp_path / "out", root)
    opts[opts.index("DATASETS.TRAIN") + 1] = "('synthetic_corrupt_train',)"
    opts[opts.index("DATASETS.TEST") + 1] = "('synthetic_corrupt_val',)"
    cfg = _setup_cfg(opts)
    with pytest.raises(ValueError, match=f"{victim.name}' cannot be read.*Replace the file"):
        KDTrainer(cfg)


class _AutocastProbe(torch.nn.Module):
    """Records which autocast is on during forward and returns a loss dict."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 4))
        self.seen = []

    def forward(self, data):
        self.seen.append(
            (
                torch.is_autocast_enabled("cpu"),
                torch.get_autocast_dtype("cpu"),
                (data @ self.w).dtype,
            )
        )
        return {"loss": (data @ self.w).float().pow(2).mean()}


def test_amp_trainer_follows_the_model_device(monkeypatch):
    """A CPU model runs bfloat16 CPU autocast even where CUDA is available (it used to pick CUDA
    autocast, which leaves CPU ops in float32), and builds no CUDA grad scaler."""
    from kd_det.engine.trainer import CPUAMPTrainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = _AutocastProbe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = CPUAMPTrainer(model, iter([torch.ones(2, 4)] * 3), opt)
    assert trainer.device_type == "cpu"
    assert not trainer.grad_scaler.is_enabled()
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()
    assert model.seen == [(True, torch.bfloat16, torch.bfloat16)]
    assert not torch.equal(model.w.detach(), torch.ones(4, 4))  # the step updated the weights
