"""Fault injection: weights of another architecture, and tool arguments that used to be accepted
wrongly or end in a raw traceback.

* Lite2 weights under a Lite0 config: ``--eval-only``, ``compare_predictions.py`` and the trace's
  loader refuse them with the keys named (they used to load with fvcore's one "Skip loading" line
  per key and evaluate a half-random model), as the export does.
* ``compare_predictions.py`` ``--output`` with the wrong extension, ``--num-images`` 0 or -2 (which
  drew 2 images), a missing weights file; ``trace_student.py`` ``--output`` that exists as a file,
  an export folder without the export, a missing image: each stops in argument parsing, before any
  model is built, naming the argument.
"""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.checkpoint import WeightsMismatchError
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import run_tool

LITE0 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite0_FPN.yaml")
LITE2 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_lite2_FPN.yaml")


def _cfg(config, out):
    cfg = get_kd_cfg()
    cfg.merge_from_file(config)
    cfg.merge_from_list(tiny_overrides(out) + ["MODEL.EFFICIENTNET.PRETRAINED", "False"])
    return cfg


@pytest.fixture(scope="module")
def lite2_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("lite2")
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(_cfg(LITE2, d)), save_dir=str(d)).save("lite2")
    return str(d / "lite2.pth")


def _refused_with_keys(text, weights):
    assert weights in text, text[-2000:]
    assert f"does not match config '{LITE0}'" in text, text[-2000:]
    assert "189 shape mismatches, e.g. backbone." in text and "checkpoint (32, 48, 1, 1)" in text
    assert "Skip loading" not in text


def test_eval_only_refuses_weights_of_another_architecture(tmp_path, synthetic_root, lite2_weights):
    args = ["--config-file", LITE0, "--eval-only", "MODEL.WEIGHTS", lite2_weights]
    args += tiny_overrides(tmp_path, synthetic_root) + ["MODEL.EFFICIENTNET.PRETRAINED", "False"]
    proc = run_tool(REPO, "train_net.py", args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    _refused_with_keys(proc.stderr, lite2_weights)
    assert not (tmp_path / "eval_results.json").exists()


def test_compare_refuses_weights_of_another_architecture(tmp_path, synthetic_root, lite2_weights):
    args = ["--student-config", LITE0, "--student-weights", lite2_weights, "--num-images", "1",
            "--output", str(tmp_path / "grid.png")]  # fmt: skip
    args += tiny_overrides(tmp_path, synthetic_root)
    proc = run_tool(REPO, "compare_predictions.py", args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    _refused_with_keys(proc.stderr, lite2_weights)
    assert not (tmp_path / "grid.png").exists()


def test_trace_loader_refuses_weights_of_another_architecture(tmp_path, lite2_weights):
    from kd_det.export.deploy import load_student

    config = tmp_path / "config.yaml"
    config.write_text(_cfg(LITE0, tmp_path).dump())
    with pytest.raises(WeightsMismatchError) as info:
        load_student(str(config), lite2_weights)
    assert lite2_weights in str(info.value) and "shape mismatches" in str(info.value)


# ------------------------------------------------------------------------------------------------
# arguments, refused before any model is built
# ------------------------------------------------------------------------------------------------


def _compare_args(tmp_path, **change):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    args = {"--student-config": LITE0, "--student-weights": str(weights),
            "--num-images": "2", "--output": str(tmp_path / "grid.png")}  # fmt: skip
    args.update(change)
    return [x for kv in args.items() for x in kv]


COMPARE_FAULTS = {
    "output_txt": ({"--output": "grid.txt"}, "--output: 'grid.txt' must end with .png, .jpg"),
    "output_without_extension": ({"--output": "grid"}, "'grid' must end with .png"),
    "num_images_zero": ({"--num-images": "0"}, "--num-images: must be >= 1, got 0"),
    "num_images_negative": ({"--num-images": "-2"}, "--num-images: must be >= 1, got -2"),
    "num_images_not_a_number": ({"--num-images": "all"}, "'all' is not a int"),
    "score_threshold_above_one": ({"--score-threshold": "1.5"}, "must be in [0, 1], got 1.5"),
    "scale_negative": ({"--scale": "-1"}, "--scale: must be >= 0"),
    "missing_weights": ({"--student-weights": "nope.pth"}, "--student-weights 'nope.pth' does "),
}


@pytest.mark.parametrize("fault", sorted(COMPARE_FAULTS))
def test_compare_arguments_are_checked_first(tmp_path, fault):
    change, words = COMPARE_FAULTS[fault]
    proc = run_tool(REPO, "compare_predictions.py", _compare_args(tmp_path, **change))
    assert proc.returncode == 2, proc.stderr[-2000:]  # argparse's usage error
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def _export_dir(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    (d / "model_final.pth").write_bytes(b"")
    image = tmp_path / "image.jpg"
    image.write_bytes(b"")
    return d, image


TRACE_FAULTS = {
    "output_is_a_file": (lambda d, im: ["--output", str(im)], "exists and is not a directory"),
    "export_dir_without_export": (
        lambda d, im: (os.remove(d / "model_final.pth"), [])[1],
        "holds no model_final.pth; give the --output folder of tools/export_student.py",
    ),
    "image_missing": (lambda d, im: (os.remove(im), [])[1], "image.jpg' does not exist"),
    "atol_zero": (lambda d, im: ["--atol", "0"], "--atol must be > 0"),
}


@pytest.mark.parametrize("fault", sorted(TRACE_FAULTS))
def test_trace_arguments_are_checked_first(tmp_path, fault):
    inject, words = TRACE_FAULTS[fault]
    export, image = _export_dir(tmp_path)
    extra = inject(export, image)
    proc = run_tool(
        REPO, "trace_student.py", ["--export-dir", str(export), "--image", str(image)] + extra
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (export / "model.ts").exists()
