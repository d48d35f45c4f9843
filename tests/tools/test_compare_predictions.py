"""tools/compare_predictions.py on tiny random-weight models: one PNG, one column per model."""

import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from PIL import Image

from conftest import CONFIGS, REPO, tiny_overrides
from kd_det.config import get_kd_cfg
from kd_det.utils.testing import run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")
#: Height in pixels of the tool's title row (``HEADER`` in tools/compare_predictions.py).
HEADER = 28


def _compare(args):
    proc = run_tool(REPO, "compare_predictions.py", args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory, synthetic_root):
    """Random teacher and student checkpoints, and a distillation config naming the teacher."""
    d = tmp_path_factory.mktemp("compare")
    opts = tiny_overrides(d, synthetic_root)
    paths = {}
    for seed, name in ((1, "teacher"), (2, "student"), (3, "distilled")):
        cfg = get_kd_cfg()
        cfg.merge_from_file(R18)
        cfg.merge_from_list(opts)
        torch.manual_seed(seed)
        DetectionCheckpointer(build_model(cfg), save_dir=str(d)).save(name)
        paths[name] = str(d / f"{name}.pth")
    model_opts = [
        x for k, v in zip(opts[0::2], opts[1::2]) if k.startswith("MODEL.") for x in (k, v)
    ]
    kd_yaml = d / "distill.yaml"
    kd_yaml.write_text(
        f"_BASE_: {R18}\n"
        "MODEL:\n"
        "  META_ARCHITECTURE: DistillationRCNN\n"
        "  KD:\n"
        "    TEACHER:\n"
        f"      CONFIG_FILE: {R18}\n"
        f"      WEIGHTS: {paths['teacher']}\n"
        f"      OPTS: {model_opts!r}\n"
    )
    return dict(paths, distill_config=str(kd_yaml), opts=opts)


def test_grid_of_ground_truth_teacher_student_and_distilled(tmp_path, models):
    out = tmp_path / "cmp" / "compare.png"
    _compare([
        "--distilled-config", models["distill_config"],
        "--distilled-weights", models["distilled"],
        "--student-config", R18, "--student-weights", models["student"],
        "--num-images", "2", "--score-threshold", "0.0", "--scale", "2",
        "--output", str(out),
    ] + models["opts"])  # fmt: skip
    img = np.asarray(Image.open(out).convert("RGB"))
    # 64 px validation images drawn at scale 2: 2 rows of 4 columns of 128 px under the titles.
    assert img.shape == (HEADER + 2 * 128, 4 * 128, 3)
    header, cells = img[:HEADER], img[HEADER:]
    for col in range(4):  # every column has a title (dark text on white)
        assert (header[:, col * 128 : (col + 1) * 128] < 100).any()
    gt = cells[:128, :128].astype(int)
    for col in range(1, 4):  # each model's panel shows its own detections, not the ground truth
        assert np.abs(cells[:128, col * 128 : (col + 1) * 128].astype(int) - gt).mean() > 1
    teacher, distilled = cells[:128, 128:256], cells[:128, 384:512]
    assert not np.array_equal(teacher, distilled)  # the teacher came from the distill config


def test_a_single_model_gives_two_columns(tmp_path, models):
    out = tmp_path / "one.png"
    _compare(["--student-config", R18, "--student-weights", models["student"],
              "--dataset", "synthetic_val", "--num-images", "3", "--scale", "1",
              "--output", str(out)] + models["opts"])  # fmt: skip
    assert Image.open(out).size == (2 * 64, HEADER + 3 * 64)


def test_config_without_weights_is_refused(tmp_path, models):
    args = ["--student-config", R18, "--output", tmp_path / "x.png"]
    proc = run_tool(REPO, "compare_predictions.py", args, timeout=300)
    assert proc.returncode != 0
    assert "--student-config and --student-weights go together" in proc.stderr
