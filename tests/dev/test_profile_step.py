"""dev/profile_step.py: one tiny profiled run per method, its table and the operator list."""

import json

from conftest import REPO
from kd_det.utils.testing import run_script


def test_profile_step_smoke(tmp_path):
    args = ["--methods", "student", "ssim", "--workers", "0", "--iters", "1", "--warmup", "0",
            "--image-size", "64", "--batch", "1", "--data", tmp_path / "data",
            "--output", tmp_path / "out", "--ops"]  # fmt: skip
    proc = run_script(REPO, "dev/profile_step.py", args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| student |" in proc.stdout and "| ssim |" in proc.stdout
    res = json.load(open(tmp_path / "out" / "profile.json"))["results"]
    assert [(r["method"], r["workers"]) for r in res] == [("student", 0), ("ssim", 0)]
    assert all(r["parts"]["total"] > 0 for r in res)
