"""Random state that checkpoints carry, so a resumed run draws what the uninterrupted one drew.

The model itself draws random numbers while training: detectron2's proposal and ROI samplers call
``torch.randperm`` on torch's global generator. A run resumed from a checkpoint restarts that
generator from the process seed, so without its saved state the sampled proposals (and everything
after them) differ from an uninterrupted run. :class:`GlobalRNGState` is a checkpointable (an
object with ``state_dict``/``load_state_dict``, as ``DetectionCheckpointer`` expects) holding the
global ``random``, ``numpy`` and torch generators (CUDA included when present).

Evaluation in the middle of training must not draw from those generators either, or an
uninterrupted run would see draws that a run resumed after the evaluation did not:
:func:`preserved_global_rng` brackets it.
"""

import contextlib
import logging
import random

import numpy as np
import torch
from detectron2.utils import comm

logger = logging.getLogger(__name__)


def capture_global_rng() -> dict:
    """The state of ``random``, ``numpy.random`` and torch's CPU (and CUDA) generators.

    Stored as tensors, lists and numbers only, so that checkpoints stay loadable with
    ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict) -> None:
    """Inverse of :func:`capture_global_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        _restore_cuda_rng(state["cuda"])


def _restore_cuda_rng(saved) -> None:
    """Restore one generator per visible GPU from ``saved`` (one state per GPU of the saving host).

    ``torch.cuda.set_rng_state_all`` indexes the devices by the saved list, so a checkpoint written
    on a host with more visible GPUs (8) than this one (1) would raise for device 1. Devices
    present in both are restored; the others keep their seeds, with a warning (draws on those
    devices then differ from an uninterrupted run).
    """
    present = torch.cuda.device_count()
    for device, rng_state in enumerate(saved[:present]):
        torch.cuda.set_rng_state(rng_state, device)
    if len(saved) != present:
        logger.warning(
            f"The checkpoint holds the random state of {len(saved)} GPU(s) and this process sees "
            f"{present}; restored {min(len(saved), present)}. Random draws on CUDA may differ "
            "from an uninterrupted run."
        )


@contextlib.contextmanager
def preserved_global_rng():
    """Run a block (e.g. an evaluation) without consuming the global random streams."""
    state = capture_global_rng()
    try:
        yield
    finally:
        restore_global_rng(state)


class GlobalRNGState:
    """Checkpointable global random state of this process (registered as ``"rng"``).

    Only the main process writes checkpoints, so the saved state is rank 0's; on load, other ranks
    keep their own streams (their sampled proposals then differ from an uninterrupted multi-process
    run, which the README states).
    """

    def state_dict(self) -> dict:
        return {"rank": comm.get_rank(), "state": capture_global_rng()}

    def load_state_dict(self, data: dict) -> None:
        if data.get("rank", 0) != comm.get_rank():
            return
        restore_global_rng(data["state"])
        logger.info("Restored the global random state saved with the checkpoint.")
