"""detectron2's checkpointer, reading every file as data and, on request, refusing weights that do
not fit the model.

* **Safe reading.** ``DetectionCheckpointer`` reads a ``.pkl`` with ``pickle.load`` and other files
  with ``torch.load`` at torch's default, so a crafted weights file runs its code while it loads.
  :class:`SafeDetectionCheckpointer` reads ``.pkl`` files through the restricted unpickler and
  everything else with ``weights_only=True`` (:mod:`.safe_load`); detectron2's format handling
  (model-zoo and Caffe2 ``.pkl``, ``.pyth``, ``detectron2://`` URLs) is unchanged.
* **Mismatch refusal.** fvcore's ``load`` is non-strict: weights of another architecture load
  "successfully" after one "Skip loading" line per key, and the model evaluates half-random.
  Evaluation, comparison and tracing call :meth:`SafeDetectionCheckpointer.refuse_mismatch` first:
  missing keys or shape mismatches then stop the load with the keys named. Keys the model does
  not use are logged and ignored (a distilled student's adapters, a teacher's extra heads).
"""

import logging

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .safe_load import load_checkpoint, load_pickle

logger = logging.getLogger(__name__)

__all__ = ["SafeDetectionCheckpointer", "WeightsMismatchError", "describe_mismatch"]


class WeightsMismatchError(ValueError):
    """Weights that would leave part of the model at its random initialisation."""


def describe_mismatch(missing, shapes):
    """One line naming the first missing keys and shape mismatches ("" when there are none).

    Args:
        missing (list[str]): model keys the checkpoint lacks.
        shapes (list[tuple]): ``(key, checkpoint shape, model shape)``.
    """
    parts = []
    mismatched = {k for k, _, _ in shapes}
    missing = [k for k in missing if k not in mismatched]  # fvcore lists those as missing too
    if shapes:
        shown = "; ".join(
            f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in shapes[:4]
        )
        parts.append(f"{len(shapes)} shape mismatches, e.g. " + shown)
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. " + ", ".join(missing[:6]))
    return " | ".join(parts)


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that never unpickles code (see the module docstring).

    Attributes:
        incompatible: fvcore's incompatible-keys report of the last load (None before one).
    """

    incompatible = None
    _refuse = None  # (what the weights are called, the config they must fit)
    _loading = None

    def refuse_mismatch(self, what, config):
        """Make the next loads raise :class:`WeightsMismatchError` on missing keys or shapes.

        Args:
            what (str): how the message names the weights, e.g. "MODEL.WEIGHTS".
            config (str): the config the weights must fit, named in the message.

        Returns:
            SafeDetectionCheckpointer: ``self``, for chaining.
        """
        self._refuse = (what, config)
        return self

    def load(self, path, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = load_pickle(filename)
            if not isinstance(data, dict):
                raise ValueError(f"'{filename}' holds a {type(data).__name__}, not weights.")
            if "model" in data and "__author__" in data:
                # detectron2 model-zoo format
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            # Caffe2 / Detectron1 model zoo (what DetectionCheckpointer does with it)
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            data = load_checkpoint(filename)
            if "model_state" not in data:
                raise ValueError(
                    f"Cannot load .pyth file {filename}; pycls checkpoints must contain "
                    "'model_state'."
                )
            model_state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f):
        return load_checkpoint(f, map_location=torch.device("cpu"))

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        self.incompatible = incompatible
        if self._refuse is None or incompatible is None:
            return incompatible
        what, config = self._refuse
        problem = describe_mismatch(list(incompatible.missing_keys), incompatible.incorrect_shapes)
        if problem:
            raise WeightsMismatchError(
                f"{what} '{self._loading}' does not match config '{config}': {problem}. Use the "
                "config (and overrides) these weights were trained with; with these, part of the "
                "model would keep its random initialisation."
            )
        if incompatible.unexpected_keys:
            logger.info(
                f"{what} '{self._loading}': {len(incompatible.unexpected_keys)} keys the model "
                f"does not use are ignored, e.g. {incompatible.unexpected_keys[:4]}"
            )
            return incompatible._replace(unexpected_keys=[])
        return incompatible
