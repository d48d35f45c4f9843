"""dev/check_equivalence.py end to end at tiny size: a base commit in a git worktree against this
checkout, weights compared tensor by tensor, the worktree removed afterwards."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


def test_head_against_itself_is_identical(tmp_path):
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    cmd = [sys.executable, os.path.join(REPO, "dev", "check_equivalence.py"), "--base", "HEAD",
           "--runs", "student", "--iters", "2", "--image-size", "64", "--batch", "2",
           "--num-train", "4", "--num-val", "2", "--output", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.load(open(tmp_path / "equivalence.json"))
    (row,) = res["runs"]
    assert row["run"] == "student" and row["identical"] and row["differ"] == 0
    assert row["tensors"] > 100 and row["base_ap"] == row["head_ap"]
    assert "| student |" in (tmp_path / "equivalence.md").read_text()
    assert not (tmp_path / "base_tree").exists()  # the temporary worktree is gone
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True,
                               text=True).stdout  # fmt: skip
    assert str(tmp_path) not in worktrees
