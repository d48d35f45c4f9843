"""dev/coco_scale_step.py builds a COCO config with stand-in weights and trains one step on CPU
(here at reduced size; the real 800 x 1333 run is in docs/performance.md)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_coco_scale_step_reduced(tmp_path):
    cmd = [
        sys.executable, os.path.join(REPO, "dev", "coco_scale_step.py"), "--height", "96",
        "--width", "128", "--configs", "faster_rcnn_R101_to_R50_FPN_1x_ssim.yaml",
        "--output", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.load(open(tmp_path / "coco_scale_step.json"))
    assert row["config"] == "faster_rcnn_R101_to_R50_FPN_1x_ssim.yaml" and row["amp"]
    assert row["finite"] and row["peak_rss_mb"] > 0 and row["input"] == "2 x 96x128"
    assert row["kd_terms"] == [f"loss_kd_fpn_p{i}" for i in range(2, 7)]
    assert (
        "| faster_rcnn_R101_to_R50_FPN_1x_ssim.yaml | True |"
        in (tmp_path / "coco_scale_step.md").read_text()
    )
