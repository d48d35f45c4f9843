"""The global random state carried by checkpoints (kd_det/engine/rng.py)."""

import logging
import random

import numpy as np
import torch

from kd_det.engine import rng


def test_capture_restore_round_trip():
    """Draws after a restore repeat the draws after the capture, for every generator."""
    state = rng.capture_global_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    rng.restore_global_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2])


def test_restore_takes_more_gpu_states_than_devices(monkeypatch, kd_log):
    """A checkpoint saved on a host with 2 visible GPUs resumes on a host with 1: device 0 is
    restored, the extra state is ignored with a warning, nothing indexes a missing device."""
    restored = []

    def set_rng_state(new_state, device):
        if device >= 1:
            raise RuntimeError(f"invalid device {device}")  # what CUDA would do
        restored.append((device, new_state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    state = rng.capture_global_rng()
    saved = [torch.full((16,), 7, dtype=torch.uint8), torch.full((16,), 9, dtype=torch.uint8)]
    state["cuda"] = saved
    rng.restore_global_rng(state)
    assert [d for d, _ in restored] == [0]
    assert torch.equal(restored[0][1], saved[0])
    assert "holds the random state of 2 GPU(s) and this process sees 1" in kd_log.text
    assert any(r.levelno == logging.WARNING for r in kd_log)


def test_restore_fewer_gpu_states_than_devices(monkeypatch, kd_log):
    """Saved on 1 GPU, resumed with 2 visible: device 0 restored, device 1 keeps its seed."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.append(d))
    state = rng.capture_global_rng()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    rng.restore_global_rng(state)
    assert restored == [0]
    assert "restored 1" in kd_log.text
