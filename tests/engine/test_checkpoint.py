"""Crash-safe checkpoint writes."""

import os

import pytest
import torch
from torch import nn

from kd_det.engine.checkpoint import AtomicDetectionCheckpointer, atomic_torch_save


def test_atomic_save_roundtrip(tmp_path):
    path = tmp_path / "x.pth"
    atomic_torch_save({"a": torch.arange(3)}, str(path))
    assert torch.equal(torch.load(str(path))["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001")
    good = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial bytes of a checkpoint")  # a torn write, then the process "dies"
        raise KeyboardInterrupt("simulated kill during torch.save")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002")
    monkeypatch.setattr(torch, "save", real_save)

    # No partial target, no leftover temp file, and the tag still names the complete checkpoint.
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")
    fresh = nn.Linear(3, 2)
    AtomicDetectionCheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k])
