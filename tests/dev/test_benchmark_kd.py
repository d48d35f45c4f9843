"""dev/benchmark_kd.py runs end to end at tiny size and reports every variant (no timing
asserts)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_benchmark_kd_smoke(tmp_path):
    cmd = [
        sys.executable, os.path.join(REPO, "dev", "benchmark_kd.py"),
        "--image-size", "64", "--batch", "1", "--iters", "1", "--warmup", "0",
        "--variants", "student", "teacher_forward", "ssim",
        "--output", str(tmp_path),
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.KD.TEACHER.OPTS", "['MODEL.FPN.OUT_CHANNELS', '48']",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "benchmark_kd.json"))["results"]
    assert set(res) == {"student", "teacher_forward", "ssim"}
    assert res["student"]["losses"] == [] and res["teacher_forward"]["losses"] == []
    assert res["ssim"]["losses"] == [f"loss_kd_fpn_p{i}" for i in range(2, 7)]
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in res.values())
    md = (tmp_path / "benchmark_kd.md").read_text()
    assert "| ssim |" in md and "x student" in md
