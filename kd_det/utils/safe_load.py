"""Reading files that anyone may have written, without running anything they hold.

A checkpoint, a model-zoo ``.pkl`` and a YAML config are data, but the formats can carry code:
``pickle`` (under ``torch.load`` too) calls whatever global a file names, and PyYAML's unsafe
loader builds any Python object a tag names. kd_det reads each with a loader that can only build
data, and names the file when it refuses one. Concepts:

* **Checkpoints** (:func:`load_checkpoint`): ``torch.load(weights_only=True)`` whatever torch's
  default is (it was ``False`` before torch 2.6).
* **detectron2 ``.pkl`` files** (:func:`load_pickle`): the model zoo's format, a pickled dict of
  numpy arrays, read by :class:`RestrictedUnpickler`, which resolves only the globals such files
  use (numpy's array reconstruction, ``OrderedDict``, ``codecs.encode`` for Python 2 bytes).
* **YAML** (:func:`load_yaml`): ``yaml.SafeLoader`` that also refuses a key given twice in one
  mapping (YAML would keep the last silently, dropping a whole ``SOLVER:`` block).
"""

import collections
import os
import pickle

import yaml

__all__ = ["UnsafeFileError", "RestrictedUnpickler", "load_checkpoint", "load_pickle", "load_yaml"]


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse a key given twice."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice (first at line {seen[key] + 1}); YAML would "
                    "keep only the last one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path):
    """Parse a YAML file with a safe loader that also refuses duplicate keys.

    Raises:
        UnsafeFileError: a tag that needs PyYAML's unsafe loader (``!!python/...``), or a key
            given twice; the message names the file, the line and the fix.
        FileNotFoundError: no such file.
    """
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.constructor.ConstructorError as e:
            where = f"{os.fspath(path)}, line {e.problem_mark.line + 1}" if e.problem_mark else path
            if "twice" in str(e.problem):
                raise UnsafeFileError(
                    f"Config file '{where}': {e.problem}. Merge the two blocks into one."
                ) from None
            raise UnsafeFileError(
                f"Config file '{where}': {e.problem}. kd_det reads configs with a safe YAML "
                "loader and never builds Python objects from tags such as !!python/...: they "
                "can run code. Write plain values (numbers, strings, lists, mappings)."
            ) from None
