"""Weight files anyone may have written are read without running what they hold
(kd_det/checkpoint/safe_load.py). Every payload would create a marker file; the marker must not
appear, and the refusal names the file."""

import collections
import os
import pickle
import warnings

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


def _py2_numpy1_pickle(arrays, author):
    """The bytes of a pickle as Python 2 with numpy 1.x wrote detectron2's model-zoo files:
    protocol 2, ``numpy.core.multiarray._reconstruct`` globals, array data and names as Python 2
    byte strings (SHORT_BINSTRING / BINSTRING, decoded as latin1). Assembled opcode by opcode,
    since no Python 2 is at hand to write one."""
    import struct

    def string(b):  # a Python 2 ``str``
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    out = [b"\x80\x02", b"}", b"("]  # PROTO 2, EMPTY_DICT, MARK
    out += [string(b"__author__"), string(author.encode()), string(b"model"), b"}", b"("]
    for name, a in arrays.items():
        descr = a.dtype.str  # e.g. '<f4'
        out += [string(name.encode())]
        out += [b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n"]
        out += [b"K\x00\x85", string(b"b"), b"\x87R"]  # (0,), 'b' -> TUPLE3, REDUCE
        out += [b"(K\x01"]  # state: MARK, version 1
        out += [b"(" + b"".join(b"J" + struct.pack("<i", d) for d in a.shape) + b"t"]
        out += [b"cnumpy\ndtype\n", string(descr[1:].encode()), b"K\x00K\x01\x87R"]
        out += [
            b"(K\x03",
            string(descr[0].encode()),
            b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
        ]
        out += [b"\x89", string(a.tobytes()), b"tb"]  # False (C order), raw data; BUILD
    out += [b"u", b"u", b"."]  # SETITEMS (model), SETITEMS (top), STOP
    return b"".join(out)


def test_python2_numpy1_model_zoo_pickle_loads(tmp_path):
    """A file in the byte format of the model zoo's R-50.pkl / model_final_*.pkl (written by
    Python 2 and numpy 1.x) loads through the restricted unpickler with its values intact, as it
    does through plain ``pickle`` (the check that the assembled bytes are a valid pickle)."""
    arrays = {"conv1_w": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
              "res2_0_branch1_bn_s": np.array([0.5, -1.25], np.float32),
              "fc1000_b": np.arange(3, dtype=np.float64)}  # fmt: skip
    path = tmp_path / "R-50.pkl"
    path.write_bytes(_py2_numpy1_pickle(arrays, "Detectron"))
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 on numpy.core
        reference = pickle.load(f, encoding="latin1")
    data = load_pickle(str(path))
    assert data["__author__"] == reference["__author__"] == "Detectron"
    for name, a in arrays.items():
        assert data["model"][name].dtype == a.dtype
        np.testing.assert_array_equal(data["model"][name], a)
        np.testing.assert_array_equal(reference["model"][name], a)
