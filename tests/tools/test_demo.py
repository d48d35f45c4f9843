"""tools/demo.py end to end at tiny size: three trainings, a table, reuse on the second call."""

import json
import os
import subprocess
import sys

from conftest import REPO

# A 2-iteration teacher is useless: --teacher-min-ap 0 makes the teacher check only log its AP.
ARGS = ["--num-train", "8", "--num-val", "4", "--image-size", "64", "--teacher-iters", "2",
        "--student-iters", "2", "--batch", "2", "--teacher-min-ap", "0"]  # fmt: skip


def test_demo_tiny(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--output", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + ARGS, capture_output=True, text=True, cwd=REPO, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))
    for k in ("teacher", "student", "distilled"):
        assert set(res[k]) >= {"AP", "AP50", "APs", "APm", "APl"}
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and "student + SSIM KD" in md  # header + 3 rows
    for run in ("teacher_lite2", "student_lite0", "student_lite0_ssim_kd"):
        assert (tmp_path / run / "metrics.json").exists()
        assert (tmp_path / run / "model_final.pth").exists()
    kd_metrics = (tmp_path / "student_lite0_ssim_kd" / "metrics.json").read_text()
    assert "loss_kd_fpn_p2" in kd_metrics
    assert (tmp_path / "student_lite0_ssim_kd" / "teacher_check.json").exists()
    assert (tmp_path / "compare.png").stat().st_size > 0  # ground truth + 3 models side by side

    again = subprocess.run(
        cmd + ARGS, capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the finished run") == 3
