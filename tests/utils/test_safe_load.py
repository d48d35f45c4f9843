"""Files anyone may have written are read without running what they hold
(kd_det/utils/safe_load.py). Every payload would create a marker file; the marker must not appear,
and the refusal names the file."""

import collections
import os
import pickle

import numpy as np
import pytest
import torch

from kd_det.utils.safe_load import UnsafeFileError, load_checkpoint, load_pickle, load_yaml


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
    for protocol in (2, 4):
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


def test_yaml_python_tags_and_duplicate_keys_are_refused(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'SEED: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UnsafeFileError, match=r"evil\.yaml, line 1.*safe YAML loader"):
        load_yaml(str(evil))
    assert not marker.exists()
    dup = tmp_path / "dup.yaml"
    dup.write_text("SOLVER:\n  BASE_LR: 0.1\nMODEL:\n  DEVICE: cpu\nSOLVER:\n  MAX_ITER: 4\n")
    with pytest.raises(UnsafeFileError, match=r"dup\.yaml, line 5.*'SOLVER' twice \(first at "
                       r"line 1\)"):  # fmt: skip
        load_yaml(str(dup))
    ok = tmp_path / "ok.yaml"
    ok.write_text("A:\n  B: [1, 2]\n  C: {x: 1}\nD: 'text'\n")
    assert load_yaml(str(ok)) == {"A": {"B": [1, 2], "C": {"x": 1}}, "D": "text"}
