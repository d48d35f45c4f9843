"""Reading weight files that anyone may have written, without running anything they hold.

A checkpoint and a model-zoo ``.pkl`` are data, but both formats are pickles, and ``pickle`` (under
``torch.load`` too) calls whatever global a file names. kd_det reads each with a loader that can
only build data, and names the file when it refuses one. Concepts:

* **Checkpoints** (:func:`load_checkpoint`): ``torch.load(weights_only=True)`` whatever torch's
  default is (it was ``False`` before torch 2.6).
* **detectron2 ``.pkl`` files** (:func:`load_pickle`): the model zoo's format, a pickled dict of
  numpy arrays, read by :class:`RestrictedUnpickler`, which resolves only the globals such files
  use (numpy's array reconstruction, ``OrderedDict``, ``codecs.encode`` for Python 2 bytes).

Config YAML is read safely by :mod:`kd_det.config.loading`.
"""

import collections
import pickle

__all__ = ["UnsafeFileError", "RestrictedUnpickler", "load_checkpoint", "load_pickle"]


class UnsafeFileError(ValueError):
    """A file asks for something a data loader must not do (run code, or be ambiguous)."""


#: ``(module, name)`` globals a detectron2 / Detectron / torchvision-converted ``.pkl`` may name.
PICKLE_ALLOWED = frozenset(
    {
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays in protocol-5 pickles
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds containers, strings, numbers and numpy arrays, and nothing else.

    ``pickle`` turns a ``GLOBAL`` opcode into an import and the next ``REDUCE`` into a call, which
    is how a crafted file runs ``os.system``; here only :data:`PICKLE_ALLOWED` resolves.
    """

    def __init__(self, file, path, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in PICKLE_ALLOWED:
            if module == "collections":
                return collections.OrderedDict
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"'{self.path}' asks to load the Python object {module}.{name}, which a weights file "
            "does not need and which could run code; kd_det reads .pkl files as containers of "
            "numpy arrays only. Convert the weights with a trusted tool (e.g. torch.save of a "
            "state dict of tensors) or use a checkpoint from a source you trust."
        )


def load_pickle(path):
    """A detectron2-format ``.pkl`` (dict of numpy arrays), read by :class:`RestrictedUnpickler`.

    Raises:
        UnsafeFileError: the file names a global outside :data:`PICKLE_ALLOWED`.
    """
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, path, encoding="latin1").load()


def load_checkpoint(path, map_location="cpu"):
    """``torch.load`` of ``path`` with ``weights_only=True``; the refusal names the file.

    Raises:
        UnsafeFileError: the file needs more than tensors and containers (torch's
            ``UnpicklingError``: an unsupported global), or is not a checkpoint.
    """
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next(
            (line for line in first if "global" in line.lower()), first[0] if first else ""
        )
        raise UnsafeFileError(
            f"'{path}' is not a plain weights file: torch.load(weights_only=True) refused it "
            f"({detail.strip()}). kd_det does not unpickle arbitrary objects, which could run "
            "code. Re-save it as tensors (torch.save({'model': model.state_dict()}, path)) from "
            "a source you trust."
        ) from None
