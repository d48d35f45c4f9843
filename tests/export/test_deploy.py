"""The exported student traces to TorchScript (detectron2's TracingAdapter) and gives the eager
model's boxes, scores and classes, at the traced input size and at another one: through
``tools/trace_student.py`` as a user runs it, and through :mod:`kd_det.export.deploy`."""

import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from PIL import Image

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import run_tool


def _trace(export_dir, image_file, fmt="torchscript"):
    """What ``tools/trace_student.py`` does, in-process: export the student in ``export_dir``."""
    from detectron2.data.detection_utils import read_image

    from kd_det.export import deploy

    export = deploy.export_onnx if fmt == "onnx" else deploy.export_torchscript
    config, weights = (os.path.join(export_dir, f) for f in ("config.yaml", "model_final.pth"))
    return export(config, weights, export_dir, read_image(image_file, format="BGR"))


def _exported(tmp_path, config, synthetic_root):
    """A random-weight student of ``config``, exported by kd_det's export to plain detectron2.
    A RetinaNet's class logits get a wide random spread: at its init every score sits near its
    0.01 prior, and the checks need detections whose scores are not tied."""
    from kd_det.export.student import export_student

    cfg = get_kd_cfg()
    cfg.merge_from_file(os.path.join(CONFIGS, "Synthetic", config))
    cfg.merge_from_list(tiny_overrides(tmp_path, synthetic_root) + ["MODEL.WEIGHTS", ""])
    if "EFFICIENTNET" in cfg.MODEL:
        cfg.MODEL.EFFICIENTNET.PRETRAINED = False
    torch.manual_seed(0)
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        torch.nn.init.normal_(model.head.cls_score.weight, std=10.0)
        torch.nn.init.constant_(model.head.cls_score.bias, -3.0)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("student")
    return export_student(cfg, str(tmp_path / "student.pth"), str(tmp_path / "export"))


def _image(tmp_path, h=72, w=96):
    path = tmp_path / "input.png"
    rgb = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return str(path)


@pytest.mark.parametrize(
    "config",
    ["faster_rcnn_R18_FPN.yaml", "faster_rcnn_lite0_FPN.yaml", "retinanet_R18_FPN.yaml"],
)
def test_traced_student_matches_eager(tmp_path, synthetic_root, config):
    from detectron2.data.detection_utils import read_image

    from kd_det.export.deploy import _inference, load_student, preprocess

    out = _exported(tmp_path, config, synthetic_root)
    image_file = _image(tmp_path)
    export_dir = os.path.dirname(out["config"])
    args = ["--export-dir", export_dir, "--image", image_file, "--output", tmp_path / "ts"]
    proc = run_tool(REPO, "trace_student.py", args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "ts" / "model.ts"
    # MIN_SIZE_TEST 64 of a 72x96 image
    assert f"Wrote {path} (traced at 64x85)" in proc.stdout

    # Independently of the tool's own checks: reload the file, compare with a fresh eager model.
    traced = torch.jit.load(str(path))
    cfg, model = load_student(out["config"])
    image = preprocess(cfg, read_image(image_file, format="BGR"))
    adapter = TracingAdapter(model, [{"image": image}], _inference)
    for size in [(64, 85), (80, 64)]:
        x = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear")[0]
        with torch.no_grad():
            adapter(x)  # eager, through the adapter: defines outputs_schema
            ref = _inference(model, [{"image": x}])[0]["instances"]
            got = adapter.outputs_schema(traced(x))[0]["instances"]
        assert len(ref) > 0 and len(got) == len(ref)
        torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor, atol=1e-3, rtol=0)
        torch.testing.assert_close(got.scores, ref.scores, atol=1e-4, rtol=0)
        assert torch.equal(got.pred_classes, ref.pred_classes)


def test_a_trace_that_does_not_generalize_is_refused(tmp_path, synthetic_root, monkeypatch):
    """Without kd_det's padding patch, EfficientNet-Lite's trace pads every input to the traced
    size: the check on a second input size must catch it."""
    import kd_det.export.deploy as deploy

    out = _exported(tmp_path, "faster_rcnn_lite0_FPN.yaml", synthetic_root)
    monkeypatch.setattr(deploy, "make_traceable", lambda model: 0)
    with pytest.raises(RuntimeError, match="differs from the eager model on the other size input"):
        _trace(os.path.dirname(out["config"]), _image(tmp_path))


@pytest.mark.parametrize("config", ["faster_rcnn_R18_FPN.yaml", "retinanet_R18_FPN.yaml"])
def test_onnx_export_matches_eager(tmp_path, synthetic_root, config):
    """Needs the ``deploy`` extra (onnx, onnxruntime), which ``make setup`` installs."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = _exported(tmp_path, config, synthetic_root)
    res = _trace(os.path.dirname(out["config"]), _image(tmp_path), fmt="onnx")
    assert res["path"].endswith("model.onnx") and os.path.isfile(res["path"])
    for check in res["checks"].values():  # the traced size and another one (dynamic axes)
        assert check["detections"] == check["traced_detections"] > 0
        assert check["max_box_diff"] <= 1e-3 and check["max_score_diff"] <= 1e-3


def test_onnx_without_its_packages_says_what_to_install(tmp_path, synthetic_root, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    out = _exported(tmp_path, "faster_rcnn_R18_FPN.yaml", synthetic_root)
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(RuntimeError, match="pip install onnx onnxruntime"):
        _trace(os.path.dirname(out["config"]), _image(tmp_path), fmt="onnx")
