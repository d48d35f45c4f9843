"""kd_det's CPU ROIAlign backward: bit-identical to torchvision's, in isolation and in a model."""

import pytest
import torch
from detectron2.layers import ROIAlign

from kd_det.layers.roi_align import FastCPUROIAlign, load_extension, use_fast_cpu_roi_align

pytestmark = pytest.mark.skipif(load_extension() is None, reason="extension could not be built")


def _rois(n, batch, size, dtype, generator):
    b = torch.randint(0, batch, (n, 1), generator=generator).to(dtype)
    # Boxes partly and wholly outside the map, tiny and large ones: every branch of the kernel.
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * (size * 1.2) - size * 0.1
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * size * 0.8
    return torch.cat([b, xy, xy + wh], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_gradient_is_bit_identical_to_torchvision(dtype, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 20, 24, generator=g, dtype=dtype, requires_grad=True)
    rois = _rois(60, 3, 80, dtype, g)
    ref = ROIAlign((7, 7), 0.25, sampling_ratio, aligned)
    fast = FastCPUROIAlign.from_roi_align(ref)
    out = ref(x, rois)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    (expected,) = torch.autograd.grad(out, x, grad_out)
    out_fast = fast(x, rois)
    (got,) = torch.autograd.grad(out_fast, x, grad_out)
    assert torch.equal(out_fast, out)
    assert torch.equal(got, expected)
    assert expected.abs().sum() > 0  # the comparison is not between two zero tensors


def _batch(n, size, num_classes):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        inst.gt_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(4, 2, generator=g) * 20], 1))
        inst.gt_classes = torch.randint(0, num_classes, (4,), generator=g)
        out.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return out


def test_training_step_gradients_equal_with_and_without_the_swap():
    from detectron2.utils.events import EventStorage

    from conftest import CONFIGS, tiny_overrides
    from kd_det.config import get_kd_cfg
    from kd_det.engine import KDTrainer

    cfg = get_kd_cfg()
    cfg.merge_from_file(f"{CONFIGS}/Synthetic/faster_rcnn_R18_FPN.yaml")
    cfg.merge_from_list(tiny_overrides("/tmp/unused") + ["KD_TRAINER.FAST_CPU_ROI_ALIGN", "False"])
    grads = []
    for swap in (False, True):
        torch.manual_seed(0)
        model = KDTrainer.build_model(cfg)
        if swap:
            assert use_fast_cpu_roi_align(model) == 4  # one per FPN level of the box pooler
        model.train()
        torch.manual_seed(1)
        with EventStorage(0):
            losses = model(_batch(2, 64, 12))
        sum(losses.values()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
