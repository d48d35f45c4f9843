"""Stand-in weights: random detectors that behave numerically like trained ones, for cost checks.

Cost and numerics can be measured without COCO or model-zoo weights, but not with plain random
weights: a random ResNet whose norms are ``FrozenBN`` (the model zoo's; identity statistics)
normalizes nothing, so activations grow by about 10x per stage and reach 1e7 in res5. float16
then overflows, and even in float32 the heads predict Inf/NaN boxes. Concepts:

* **Calibration** (:func:`calibrate_frozen_bn`): each ``FrozenBatchNorm2d``'s scale and bias are
  set from data so that it outputs zero-mean, unit-variance channels, one layer after the other
  in forward order (the idea of LSUV initialization). BatchNorm/SyncBN/GN layers normalize by
  themselves and are left alone.
* **Detectors of a config** (:func:`calibrate_model`): the student, a distillation model's teacher
  (held outside the module tree) and an online model's peers (their EMA copies restart from the
  calibrated peers).
* **Inputs** (:func:`random_inputs`): images and boxes shaped like a ``DatasetMapper``'s output.

Used by ``dev/benchmark_gpu.py`` and ``dev/coco_scale_step.py``; nothing here is for training.
"""

from typing import List

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.structures import Boxes, Instances

__all__ = ["calibrate_frozen_bn", "calibrate_model", "random_inputs"]


def random_inputs(n, height, width, num_classes, device="cpu", seed=0, num_boxes=6) -> List[dict]:
    """``n`` training inputs: uint8-range images ``(3, H, W)`` and ``num_boxes`` boxes each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((height, width))
        size = torch.tensor([width, height], dtype=torch.float32)
        xy = torch.rand(num_boxes, 2, generator=gen) * size * 0.7
        wh = 16 + torch.rand(num_boxes, 2, generator=gen) * size * 0.3
        inst.gt_boxes = Boxes(torch.cat([xy, torch.minimum(xy + wh, size - 1)], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=gen)
        image = torch.randint(0, 256, (3, height, width), generator=gen).float()
        out.append({"image": image.to(device), "instances": inst, "height": height, "width": width})
    return out


@torch.no_grad()
def calibrate_frozen_bn(detector, inputs, eps=1e-5) -> int:
    """Set every ``FrozenBatchNorm2d`` of ``detector.backbone`` from the statistics of its input.

    One forward of the backbone on ``inputs`` (preprocessed as the detector does); a pre-hook on
    each frozen norm sets ``weight = 1 / std``, ``bias = -mean / std`` per channel (with running
    statistics 0 and ``1 - eps``, so the norm's own scale is exactly ``weight``) before that norm
    runs, so every later layer already sees calibrated inputs.

    Returns:
        int: the number of calibrated norms.
    """
    norms = [m for m in detector.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]

    def pre_hook(module, args):
        x = args[0].float()
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        module.weight.copy_(1.0 / std)
        module.bias.copy_(-mean / std)
        module.running_mean.zero_()
        module.running_var.fill_(1.0 - module.eps)

    handles = [m.register_forward_pre_hook(pre_hook) for m in norms]
    try:
        detector.backbone(detector.preprocess_image(inputs).tensor)
    finally:
        for h in handles:
            h.remove()
    return len(norms)


def calibrate_model(model, inputs) -> int:
    """Calibrate every detector a kd_det model runs (see the module docstring).

    Args:
        model: a ``GeneralizedRCNN``, ``DistillationRCNN`` or ``OnlineDistillationRCNN``.
        inputs (list[dict]): images in the model's own input format.

    Returns:
        int: calibrated norms in total.
    """
    from kd_det.modeling.common import convert_input_format

    count = 0
    peers = getattr(model, "peers", None)
    if peers is not None:
        formats = getattr(model, "peer_input_formats", [model.input_format] * len(peers))
        for peer, fmt in zip(peers, formats):
            count += calibrate_frozen_bn(
                peer, convert_input_format(inputs, model.input_format, fmt)
            )
        for ema, peer in zip(getattr(model, "ema_peers", []), peers):
            ema.load_state_dict(peer.state_dict())
        return count
    count += calibrate_frozen_bn(model, inputs)
    teacher = getattr(model, "teacher", None)
    if isinstance(teacher, torch.nn.Module):
        t_inputs = convert_input_format(inputs, model.input_format, model.teacher_input_format)
        count += calibrate_frozen_bn(teacher, t_inputs)
    return count
