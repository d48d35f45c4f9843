"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import torch

from conftest import CONFIGS, REPO, tiny_overrides

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# Mixing on, with a clean tail, so the mixed-sample mapper's random state is covered too.
MIX = ["INPUT.MIX.ENABLED", "True", "INPUT.MIX.TYPE", "cutmix", "INPUT.MIX.PROB", "0.5",
       "INPUT.MIX.CLEAN_TAIL", "0.25"]  # fmt: skip


def _opts(out, root, workers):
    opts = tiny_overrides(out, root, max_iter=8) + MIX + ["SOLVER.CHECKPOINT_PERIOD", "2"]
    opts[opts.index("DATALOADER.NUM_WORKERS") + 1] = str(workers)
    return opts


def _weights(out):
    return torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")["model"]


def test_sigkill_and_resume_is_bit_identical(tmp_path, synthetic_root):
    straight = tmp_path / "straight"
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", R18] + _opts(straight, synthetic_root, 0),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The interrupted run also uses two loader workers: batches must not depend on them.
    killed = tmp_path / "killed"
    opts = _opts(killed, synthetic_root, 2)
    child = subprocess.Popen(
        [sys.executable, TRAIN_NET, "--config-file", R18] + opts,
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        while not (killed / "model_0000003.pth").exists():
            assert child.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (killed / "model_final.pth").exists()

    proc = subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", R18, "--resume"] + opts,
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration" in proc.stdout + proc.stderr
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
