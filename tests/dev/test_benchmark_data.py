"""dev/benchmark_data.py: a smoke test at tiny size (plain mapper vs one mix type with cache)."""

from conftest import REPO
from kd_det.utils.testing import run_script


def test_benchmark_tool():
    args = [
        "--num-images",
        "3",
        "--image-size",
        "48",
        "--repeats",
        "1",
        "--types",
        "cutmix",
        "--cache-size",
        "2",
        "INPUT.MIN_SIZE_TRAIN",
        "(48,)",
        "INPUT.MAX_SIZE_TRAIN",
        "64",
    ]
    proc = run_script(REPO, "dev/benchmark_data.py", args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "plain DatasetMapper" in out and "cutmix (cache 2)" in out and "ratio to plain" in out


def test_benchmark_tool_through_loader_workers():
    """``--workers``: every mapper feeds a DataLoader with worker processes, as in training."""
    args = ["--num-images", "3", "--image-size", "48", "--repeats", "1", "--types", "mixup",
            "--cache-size", "0", "--workers", "2", "INPUT.MIN_SIZE_TRAIN", "(48,)",
            "INPUT.MAX_SIZE_TRAIN", "64"]  # fmt: skip
    proc = run_script(REPO, "dev/benchmark_data.py", args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 loader workers" in proc.stdout and "| mixup " in proc.stdout
