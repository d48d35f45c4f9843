"""dev/benchmark.py: one run covers every requested method and the mappers (no timing asserts)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_benchmark_smoke(tmp_path):
    cmd = [
        sys.executable, os.path.join(REPO, "dev", "benchmark.py"),
        "--image-size", "64", "--batch", "1", "--iters", "1", "--warmup", "0",
        "--variants", "student", "dynamic", "online",
        "--data-images", "4", "--data-size", "64", "--data-repeats", "1",
        "--speedup-pairs", "1", "--speedup-iters", "1",
        "--output", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "benchmark.json"))
    assert res["environment"]["device"] in ("cpu", "cuda")
    step = res["training_step"]
    assert set(step) == {"student", "dynamic", "online"}
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in step.values())
    # The variants really ran their methods: dynamic hints and both peers' mutual/EMA terms.
    assert "loss_kd_fpn_p2" in step["dynamic"]["losses"]
    assert "loss_kd_peer0_fpn_p2_from_peer1" in step["online"]["losses"]
    assert "loss_kd_peer1_ema_roi_cls" in step["online"]["losses"]
    mappers = res["data"]["images_per_s"]
    assert "plain DatasetMapper" in mappers and {"mixup", "cutmix", "cutnmix"} <= set(mappers)
    side = res["side_by_side"]
    assert side["jobs"] == 2 and len(side["median_s"]) == 2 and side["throughput_vs_alone"] > 0
    md = (tmp_path / "benchmark.md").read_text()
    assert "| online |" in md and "ratio to plain" in md and "Device: " in md
    assert "side by side" in md
    # Before/after of the speed-ups: the three profiled methods, both settings timed.
    speed = res["speedup"]
    assert [r["method"] for r in speed] == ["student", "ssim", "multilevel"]
    assert all(r["before_s"] > 0 and r["after_s"] > 0 for r in speed)
    assert "Speed-ups (before / after, same run)" in md and "| multilevel |" in md
