"""tools/make_synthetic_coco.py: the command line writes the dataset; --force regenerates it."""

import json
import os

from conftest import REPO
from kd_det.utils.testing import run_tool

SIZE = 64


def test_cli(tmp_path):
    out = tmp_path / "cli"
    args = [
        "--output",
        str(out),
        "--num-train",
        "3",
        "--num-val",
        "2",
        "--image-size",
        str(SIZE),
        "--seed",
        "7",
    ]
    proc = run_tool(REPO, "make_synthetic_coco.py", args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "circle" in proc.stdout
    with open(out / "train.json") as f:
        assert len(json.load(f)["images"]) == 3
    assert len(os.listdir(out / "val")) == 2
    # --force regenerates.
    proc = run_tool(REPO, "make_synthetic_coco.py", args + ["--force", "--quiet"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" not in proc.stdout and "train:" in proc.stdout
