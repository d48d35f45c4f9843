"""dev/benchmark_gpu.py runs end to end on CPU at tiny size (the GPU run is the same code with
``--device cuda``): every section reports, ratios to the floor exist, losses are finite, the
targets are printed. No timing asserts."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_benchmark_gpu_dry_run_on_cpu(tmp_path):
    cmd = [
        sys.executable, os.path.join(REPO, "dev", "benchmark_gpu.py"), "--device", "cpu",
        "--size", "64", "--batches", "1", "--iters", "1", "--warmup", "0", "--amp", "on",
        "--variants", "ssim", "--loss-batch", "1", "--loss-size", "64", "64",
        "--output", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.load(open(tmp_path / "benchmark_gpu.json"))
    assert data["device"] == "cpu" and data["skipped"] == []
    cost = data["cost"]
    assert set(cost) == {f"{v}|amp on|batch 1" for v in ("student", "floor", "ssim")}
    assert all(r["finite"] and r["s_per_step"] > 0 for r in cost.values())
    assert cost["ssim|amp on|batch 1"]["kd_terms"] == [f"loss_kd_fpn_p{i}" for i in range(2, 7)]
    assert cost["student|amp on|batch 1"]["kd_terms"] == []
    assert set(data["losses"]) == {"mse", "pkd", "cwd", "ssim_reference"}
    for row in data["numerics"].values():
        assert set(row) == {"fp32", "tf32", "fp16", "bf16"}
        assert row["fp32"]["value"] == 0 and all(c["finite"] for c in row.values())
    assert any(k.startswith("teacher forward") for k in data["floor"])
    md = (tmp_path / "benchmark_gpu.md").read_text()
    assert "| ssim | on | 1 |" in md and "x floor" in md and "<= 1.05x floor time" in md
