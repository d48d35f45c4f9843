"""Trace an exported student to TorchScript (or ONNX) with detectron2's deployment path.

``tools/export_student.py`` leaves a plain ``GeneralizedRCNN`` or ``RetinaNet`` (``config.yaml`` +
``model_final.pth``). This module does for it what detectron2's ``export_model.py
--export-method tracing`` does: build the model, wrap it in ``detectron2.export.TracingAdapter``
(tuples of tensors in and out), ``torch.jit.trace`` it on one image and save ``model.ts``; then
check that the traced model reproduces the eager boxes, scores and classes on that image and on a
second, differently sized one (:func:`export_torchscript`), since a trace freezes value-dependent
control flow. :func:`make_traceable` patches EfficientNet-Lite's "SAME" padding before tracing.
See docs/export_and_deploy.md, "TorchScript: trace the export", for the traced model's contract.
"""

import logging
import os
import types
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from kd_det.engine.checkpoint import atomic_path

logger = logging.getLogger(__name__)

#: The plain detectors kd_det's export writes and this module traces.
TRACEABLE = ("GeneralizedRCNN", "RetinaNet")


def load_student(config_file, weights=None, device="cpu"):
    """Build the exported (plain ``GeneralizedRCNN`` or ``RetinaNet``) student in eval mode.

    kd_det's config (``get_kd_cfg``) is used so that a student on a kd_det backbone
    (EfficientNet-Lite, whose exported config keeps ``MODEL.EFFICIENTNET``) loads too. The weights
    are read as data only and must fit the config: a trace of a half-random model is refused.

    Returns:
        tuple(CfgNode, nn.Module)

    Raises:
        WeightsMismatchError: missing keys or shape mismatches (the keys are named).
    """
    import kd_det  # noqa: F401  (registers kd_det's backbones)
    from detectron2.modeling import build_model

    from kd_det.checkpoint import SafeDetectionCheckpointer
    from kd_det.config import get_kd_cfg

    cfg = get_kd_cfg()
    cfg.merge_from_file(config_file)
    if weights:
        cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = device
    if "EFFICIENTNET" in cfg.MODEL:
        cfg.MODEL.EFFICIENTNET.PRETRAINED = False  # the checkpoint replaces ImageNet weights
    if cfg.MODEL.META_ARCHITECTURE not in TRACEABLE:
        raise ValueError(
            f"{config_file} is a {cfg.MODEL.META_ARCHITECTURE} config; trace the plain detector "
            f"({' or '.join(TRACEABLE)}) that tools/export_student.py writes (its config.yaml "
            "and model_final.pth)."
        )
    model = build_model(cfg)
    checkpointer = SafeDetectionCheckpointer(model).refuse_mismatch("Weights", config_file)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    return cfg, model.eval()


def preprocess(cfg, image_bgr):
    """A ``(3, H, W)`` float tensor as the traced model wants it: resized with
    ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST`` and in ``INPUT.FORMAT`` (as ``DefaultPredictor``
    prepares images)."""
    import detectron2.data.transforms as T

    aug = T.ResizeShortestEdge(
        [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
    )
    image = image_bgr[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image_bgr
    image = aug.get_transform(image).apply_image(np.ascontiguousarray(image))
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


def _same_padding_forward(self, x):
    """``Conv2dDynamicSamePadding.forward`` of efficientnet-lite-pytorch, in a traceable form.

    The package computes the output size with ``math.ceil`` (a Python constant under tracing) and
    subtracts the traced input size from it, so a trace pads every later input to the traced
    size. ``ceil(i / s) * s - i == (-i) % s`` gives the same padding from traced sizes only.
    """
    ih, iw = x.shape[-2:]
    kh, kw = self.weight.shape[-2:]
    (sh, sw), (dh, dw) = self.stride, self.dilation
    pad_h = max((-ih) % sh + (kh - 1) * dh + 1 - sh, 0)
    pad_w = max((-iw) % sw + (kw - 1) * dw + 1 - sw, 0)
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return F.conv2d(
        x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
    )


def make_traceable(model):
    """Patch, in place, the layers of ``model`` whose forward does not trace across input sizes
    (EfficientNet-Lite's "SAME" padding; numerics unchanged). Returns the number patched."""
    try:
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, Conv2dDynamicSamePadding):
            m.forward = types.MethodType(_same_padding_forward, m)
            n += 1
    return n


def _inference(model, inputs):
    # As detectron2's export_model.py: an R-CNN skips its postprocess, so outputs stay at the
    # input's resolution; a dense detector runs its forward, whose postprocess is then a no-op
    # (the inputs carry no "height"/"width", so it rescales to the input's own size).
    from detectron2.modeling import GeneralizedRCNN

    if isinstance(model, GeneralizedRCNN):
        return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
    return model(inputs)


def trace_student(model, image):
    """``TracingAdapter`` + ``torch.jit.trace`` on ``image`` (a preprocessed ``(3, H, W)``).

    Returns:
        tuple(torch.jit.ScriptModule, TracingAdapter): the traced model and the adapter whose
        ``outputs_schema`` rebuilds ``Instances`` from its outputs.
    """
    from detectron2.export import TracingAdapter

    make_traceable(model)
    adapter = TracingAdapter(model, [{"image": image}], _inference)
    adapter.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # detectron2's asserts and shape checks each warn that they are frozen into the trace;
        # the checks of export_torchscript catch what matters: a trace that does not generalize.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(adapter, (image,))
    return traced, adapter


def compare_detections(ref, got):
    """How far ``got`` (``Instances``) is from ``ref``, independent of the detections' order.

    Detections with (nearly) equal scores may come out of NMS / top-k in another order from
    another runtime, so each detection is matched to its nearest counterpart of the same class
    (both ways) instead of comparing row by row.

    Returns:
        dict: ``detections`` (ref), ``traced_detections``, ``max_box_diff`` (px),
        ``max_score_diff`` and ``classes_equal`` (every detection has a same-class counterpart).
    """
    out = {"detections": len(ref), "traced_detections": len(got)}
    if len(ref) != len(got):
        return dict(out, max_box_diff=float("inf"), max_score_diff=float("inf"))
    if len(ref) == 0:
        return dict(out, max_box_diff=0.0, max_score_diff=0.0, classes_equal=True)
    b1, b2 = ref.pred_boxes.tensor.double(), got.pred_boxes.tensor.double()
    s1, s2 = ref.scores.double(), got.scores.double()
    same = ref.pred_classes[:, None] == got.pred_classes[None, :]
    dist = torch.maximum((b1[:, None] - b2[None]).abs().amax(-1), (s1[:, None] - s2[None]).abs())
    dist = torch.where(same, dist, torch.full_like(dist, float("inf")))
    nearest = torch.maximum(dist.amin(1).max(), dist.amin(0).max()).item()
    return dict(
        out,
        max_box_diff=nearest,
        max_score_diff=(s1.sort().values - s2.sort().values).abs().max().item(),
        classes_equal=nearest < float("inf"),
    )


def _run_checks(model, run, image, atol, path):
    """Compare ``run(x)`` (Instances) with the eager model at the traced size and at 3/4 of it."""
    h, w = image.shape[1:]
    other = torch.nn.functional.interpolate(
        image[None], size=(h * 3 // 4 // 2 * 2, w * 3 // 4 // 2 * 2), mode="bilinear"
    )[0]
    checks = {}
    for name, x in (("traced_size", image), ("other_size", other)):
        with torch.no_grad():
            ref = _inference(model, [{"image": x}])[0]["instances"]
            c = checks[name] = compare_detections(ref, run(x))
        ok = c["detections"] == c["traced_detections"] and c.get("classes_equal", False)
        if not (ok and c["max_box_diff"] <= atol and c["max_score_diff"] <= atol):
            raise RuntimeError(
                f"The exported model differs from the eager model on the {name.replace('_', ' ')} "
                f"input: {c}. {path} was not written (an earlier file there is unchanged); report "
                "the model's config."
            )
    return checks


def export_torchscript(config_file, weights, output_dir, image_bgr, atol=1e-3):
    """Trace the exported student, save ``output_dir/model.ts`` and check it (module docstring).

    Args:
        config_file, weights (str): what ``tools/export_student.py`` wrote.
        output_dir (str): where ``model.ts`` goes.
        image_bgr (np.ndarray): ``(H, W, 3)`` uint8 BGR image to trace and check on; a second
            check runs on the same image resized to 3/4 (another input size).
        atol (float): tolerance on boxes (pixels) and scores.

    Returns:
        dict: the path and the checks' results.

    Raises:
        RuntimeError: the traced model does not reproduce the eager model.
    """
    cfg, model = load_student(config_file, weights)
    image = preprocess(cfg, image_bgr)
    traced, adapter = trace_student(model, image)
    path = os.path.join(output_dir, "model.ts")
    with atomic_path(path) as tmp:  # model.ts appears only once its checks passed
        traced.save(tmp)
        reloaded = torch.jit.load(tmp)
        checks = _run_checks(
            model, lambda x: adapter.outputs_schema(reloaded(x))[0]["instances"], image, atol, path
        )
    logger.info(f"Traced {config_file} to {path}; checks: {checks}")
    return {"path": path, "input_size": tuple(image.shape[1:]), "checks": checks}


def export_onnx(config_file, weights, output_dir, image_bgr, atol=1e-3):
    """Export the student to ``output_dir/model.onnx`` and check it with onnxruntime.

    Uses torch's TorchScript-based exporter (``dynamo=False``, opset 17) on the same
    ``TracingAdapter``, with height and width as dynamic axes; torch's default dynamo exporter
    fails on detectron2's Faster R-CNN at its ``torch.export`` step (torch 2.14). Needs the
    ``onnx`` and ``onnxruntime`` packages, which kd_det does not install. Arguments, return value
    and checks as :func:`export_torchscript`.
    """
    try:
        import onnx  # noqa: F401  (torch.onnx's exporter needs it)
        import onnxruntime
    except ImportError as e:
        raise RuntimeError(
            f"ONNX export needs the onnx and onnxruntime packages ({e}): "
            "pip install onnx onnxruntime"
        ) from e
    from detectron2.export import TracingAdapter

    cfg, model = load_student(config_file, weights)
    image = preprocess(cfg, image_bgr)
    make_traceable(model)
    adapter = TracingAdapter(model, [{"image": image}], _inference)
    path = os.path.join(output_dir, "model.onnx")
    with atomic_path(path) as tmp:  # model.onnx appears only once its checks passed
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                adapter.eval(), (image,), tmp, dynamo=False, opset_version=17,
                input_names=["image"], dynamic_axes={"image": {1: "height", 2: "width"}},
            )  # fmt: skip
        adapter.eval()  # the exporter restores the mode it found
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])

        def run(x):
            outputs = session.run(None, {"image": x.numpy()})
            return adapter.outputs_schema([torch.as_tensor(o) for o in outputs])[0]["instances"]

        checks = _run_checks(model, run, image, atol, path)
    logger.info(f"Exported {config_file} to {path}; checks: {checks}")
    return {"path": path, "input_size": tuple(image.shape[1:]), "checks": checks}
