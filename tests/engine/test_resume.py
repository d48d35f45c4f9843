"""A run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run.

The kill lands at three kinds of moments: right after a checkpoint, while a checkpoint is being
written (its temporary file exists), and at a random time during training (a seeded delay, so the
test is repeatable in intent though the iteration hit depends on the machine's speed).
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", R18] + _opts(out, synthetic_root, 0),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _weights(out)


# Runs train_net.py with every checkpoint write held open for a moment after its bytes are written
# (before the rename), so that a kill "during the write" can be aimed at. Numbers are unaffected.
SLOW_SAVE = """
import runpy, sys, time, torch
_save = torch.save
def slow_save(obj, f, *a, **k):
    _save(obj, f, *a, **k)
    if not isinstance(f, (str, bytes)) and not hasattr(f, "__fspath__"):
        time.sleep(0.4)
torch.save = slow_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _checkpoint_written(out):
    return (out / "model_0000003.pth").exists()


def _checkpoint_being_written(out):
    return any(p.name.endswith(".tmp") for p in out.iterdir()) if out.exists() else False


def _random_moment(seed):
    delay = random.Random(seed).uniform(0.0, 3.0)
    start = {}

    def ready(out):
        log = out / "log.txt"
        if not (log.exists() and "Starting training" in log.read_text()):
            return False
        start.setdefault("t", time.time())
        return time.time() - start["t"] >= delay

    return ready


@pytest.mark.parametrize(
    "moment",
    [_checkpoint_written, _checkpoint_being_written, _random_moment(0)],
    ids=["after_checkpoint", "during_checkpoint_write", "random_time"],
)
def test_sigkill_and_resume_is_bit_identical(tmp_path, synthetic_root, uninterrupted, moment):
    # The interrupted run also uses two loader workers: batches must not depend on them.
    killed = tmp_path / "killed"
    opts = _opts(killed, synthetic_root, 2)
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(SLOW_SAVE)
    child = subprocess.Popen(
        [sys.executable, str(wrapper), TRAIN_NET, "--config-file", R18] + opts,
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        while not moment(killed):
            if child.poll() is not None:
                pytest.skip("training ended before the kill moment came (machine too fast)")
            assert time.time() < deadline, "the kill moment never came"
            time.sleep(0.005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    proc = subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", R18, "--resume"] + opts,
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = _weights(killed)
    assert uninterrupted.keys() == b.keys()
    different = [k for k in b if not torch.equal(torch.as_tensor(uninterrupted[k]),
                                                 torch.as_tensor(b[k]))]  # fmt: skip
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
