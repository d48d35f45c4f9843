"""Weight files anyone may have written are read without running what they hold
(kd_det/checkpoint/safe_load.py). Every payload would create a marker file; the marker must not
appear, and the refusal names the file."""

import collections
import os
import pickle

import numpy as np
import pytest
import torch

from kd_det.checkpoint import UnsafeFileError, load_checkpoint, load_pickle


class _Payload:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_zoo_pickle_loads(tmp_path):
    """detectron2's model-zoo format (protocol 2, latin1) and a torchvision conversion load."""
    weights = collections.OrderedDict(
        [("conv1.weight", np.ones((2, 3), np.float32)), ("fc.bias", np.arange(3.0))]
    )
    for protocol in (2, 4, 5):
        path = tmp_path / f"zoo{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": weights, "__author__": "Detectron", "n": np.int64(3)}, f,
                        protocol=protocol)  # fmt: skip
        data = load_pickle(str(path))
        assert data["__author__"] == "Detectron" and data["n"] == 3
        np.testing.assert_array_equal(data["model"]["conv1.weight"], weights["conv1.weight"])


def test_code_in_a_pickle_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {}, "__author__": _Payload(marker)}, f, protocol=2)
    with pytest.raises(UnsafeFileError, match=r"evil\.pkl' asks to load the Python object "
                       r"(posix|os)\.system"):  # fmt: skip
        load_pickle(str(path))
    assert not marker.exists()


def test_code_in_a_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    good, evil = tmp_path / "good.pth", tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 3}, good)
    assert load_checkpoint(str(good))["iteration"] == 3
    torch.save({"model": {"w": torch.ones(2)}, "x": _Payload(marker)}, evil)
    with pytest.raises(UnsafeFileError, match=r"evil\.pth' is not a plain weights file"):
        load_checkpoint(str(evil))
    assert not marker.exists()
