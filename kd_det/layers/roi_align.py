"""ROIAlign whose CPU backward pass is faster and bit-identical to torchvision's.

On a CPU, the backward of torchvision's ``roi_align`` is the most expensive single operation of a
Faster R-CNN training step at kd_det's sizes (profile: ``dev/profile_step.py``, README
"Performance"): a single-threaded loop that recomputes the bilinear weights of every sample point
once per channel. ``csrc/roi_align_backward.cpp`` computes those weights once per sample point and
applies them to all channels (split across torch's threads). Each input element receives the same
float contributions in the same order as in torchvision, so gradients are bit-identical (tested).

The C++ code is compiled on first use with ``torch.utils.cpp_extension`` (about a minute, cached
under ``TORCH_EXTENSIONS_DIR``). Where it cannot be built (no compiler, no ``ninja``) or on a GPU,
torchvision's kernel is used, with one warning. The forward pass is always torchvision's.
"""

import logging
import os
import threading

import torch
from detectron2.layers import ROIAlign
from torch.autograd import Function

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "roi_align_backward.cpp")
_lock = threading.Lock()
_state = {"ext": None, "tried": False}


def load_extension():
    """The compiled backward (a module with ``roi_align_backward``), or None if unavailable."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                from torch.utils.cpp_extension import load

                logger.info("Loading kd_det's CPU ROIAlign backward (compiled once, then cached).")
                _state["ext"] = load(
                    name="kd_det_roi_align_backward",
                    sources=[_SOURCE],
                    extra_cflags=["-O3"],
                    verbose=False,
                )
            except Exception as e:  # no compiler / ninja / headers: fall back, once, loudly
                logger.warning(
                    f"kd_det's CPU ROIAlign backward could not be built ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); using torchvision's (same "
                    "numbers, slower). Install a C++ compiler and `pip install ninja` to enable it."
                )
        return _state["ext"]


class _ROIAlignCPU(Function):
    """torchvision's forward, kd_det's backward (CPU float tensors only)."""

    @staticmethod
    def forward(ctx, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.params = (output_size, spatial_scale, sampling_ratio, aligned, input.shape)
        return torch.ops.torchvision.roi_align(
            input, rois, spatial_scale, output_size[0], output_size[1], sampling_ratio, aligned
        )

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        (ph, pw), spatial_scale, sampling_ratio, aligned, shape = ctx.params
        b, c, h, w = shape
        grad_input = load_extension().roi_align_backward(
            grad, rois, spatial_scale, ph, pw, b, c, h, w, sampling_ratio, aligned
        )
        return grad_input, None, None, None, None, None


class FastCPUROIAlign(ROIAlign):
    """detectron2's ``ROIAlign`` with the bit-identical, faster CPU backward of this module.

    Falls back to ``ROIAlign.forward`` (torchvision) on GPUs, for inputs that need no gradient,
    for dtypes other than float32/float64, and where the extension cannot be built.
    """

    @classmethod
    def from_roi_align(cls, module: ROIAlign) -> "FastCPUROIAlign":
        return cls(module.output_size, module.spatial_scale, module.sampling_ratio, module.aligned)

    def forward(self, input, rois):
        usable = (
            input.device.type == "cpu"
            and torch.is_grad_enabled()
            and input.requires_grad
            and input.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_cpu_enabled()
            and load_extension() is not None
        )
        if not usable:
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        return _ROIAlignCPU.apply(
            input,
            rois.to(dtype=input.dtype),
            tuple(self.output_size),
            float(self.spatial_scale),
            int(self.sampling_ratio),
            bool(self.aligned),
        )


def use_fast_cpu_roi_align(model: torch.nn.Module) -> int:
    """Swap every plain ``ROIAlign`` inside ``model`` for :class:`FastCPUROIAlign`.

    Returns:
        int: the number of modules swapped.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is ROIAlign:
                setattr(parent, name, FastCPUROIAlign.from_roi_align(child))
                swapped += 1
    return swapped
