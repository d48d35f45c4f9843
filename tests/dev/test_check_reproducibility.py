"""dev/check_reproducibility.py: the loader's worker count must not change a run's bits."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_workers_do_not_change_the_weights(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "dev", "check_reproducibility.py"), "--output",
           str(tmp_path), "--iters", "3", "--variants", "reference", "workers2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.load(open(tmp_path / "reproducibility.json"))["rows"]
    assert [r["variant"] for r in rows] == ["reference", "workers2"]
    assert all(r["bit_identical"] and r["max_abs_weight_diff"] == 0.0 for r in rows)
    assert "| workers2 | `DATALOADER.NUM_WORKERS 2` | bit-identical |" in proc.stdout
