"""Reading weights: files as data only, and weights that must fit their model.

* :mod:`.safe_load`: ``torch.load(weights_only=True)`` for checkpoints and a restricted unpickler
  for detectron2's ``.pkl`` files; a file that asks for code is refused with its name.
* :mod:`.checkpointer`: :class:`SafeDetectionCheckpointer`, detectron2's checkpointer on those
  loaders, which can also refuse weights that leave part of the model random.

A low-level package: kd_det's modeling, engine, export and tools all load weights through it.
"""

from .checkpointer import SafeDetectionCheckpointer, WeightsMismatchError, describe_mismatch
from .safe_load import RestrictedUnpickler, UnsafeFileError, load_checkpoint, load_pickle

__all__ = [
    "RestrictedUnpickler",
    "SafeDetectionCheckpointer",
    "UnsafeFileError",
    "WeightsMismatchError",
    "describe_mismatch",
    "load_checkpoint",
    "load_pickle",
]
