"""tools/run_study.py end to end at tiny size: teacher once, methods x seeds, reports, resume."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

ARGS = [
    "--num-train", "8", "--num-val", "4", "--image-size", "64", "--teacher-iters", "2",
    "--iters", "2", "--batch", "2", "--methods", "student", "ssim", "--seeds", "0", "1",
    "--jobs", "2",
    # A 2-iteration teacher is useless: the teacher check would rightly stop its students.
    "--opts", "MODEL.KD.TEACHER.MIN_AP", "0.0",
]  # fmt: skip


def _study(tmp_path, args):
    """Run tools/run_study.py into ``tmp_path`` single-threaded; it must succeed."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "run_study.py"), "--output", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + list(args), capture_output=True, text=True, cwd=REPO, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_run_study_tiny(tmp_path):
    _study(tmp_path, ARGS)
    res = json.load(open(tmp_path / "results.json"))
    assert set(res["methods"]) == {"student", "ssim"}
    assert all(len(m["runs"]) == 2 for m in res["methods"].values())
    assert "AP" in res["teacher"]["bbox"]
    md = (tmp_path / "results.md").read_text()
    assert "teacher (Lite2-FPN)" in md and "+ SSIM hints (P2-P6)" in md and "+-" in md
    assert (tmp_path / "results.png").stat().st_size > 0
    assert (tmp_path / "curves.png").stat().st_size > 0  # teacher + student learning curves
    assert res["run_minutes"] > 0 and "took" in md
    # Finished runs are skipped on the next call.
    again = _study(tmp_path, ARGS)
    assert again.stdout.count("reusing the finished run") == 5  # teacher + 2 methods x 2 seeds


def test_run_study_report_only_trains_nothing(tmp_path):
    proc = _study(tmp_path, ["--report-only", "--methods", "student", "ssim", "--seeds", "0", "1"])
    assert "training;" not in proc.stdout and not (tmp_path / "runs").exists()
    res = json.load(open(tmp_path / "results.json"))
    assert res["methods"] == {} and res["finished_runs"] == 0 and res["expected_runs"] == 4
    assert "Partial: 0 of 4 runs" in (tmp_path / "results.md").read_text()


def test_run_study_rejects_unknown_method(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "run_study.py"), "--output", str(tmp_path),
           "--methods", "ssim", "distill_everything"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and "Unknown methods ['distill_everything']" in proc.stderr


def test_run_study_online_reports_every_member(tmp_path):
    args = ["--num-train", "8", "--num-val", "4", "--image-size", "64", "--iters", "2",
            "--batch", "2", "--methods", "online", "--seeds", "0"]  # fmt: skip
    _study(tmp_path, args)
    res = json.load(open(tmp_path / "results.json"))
    assert res["teacher"] is None  # online peers need no teacher
    members = res["methods"]["online"]["runs"][0]["members"]
    assert set(members) == {"peer0", "peer1", "ema0", "ema1"}
    assert "| online: 2 Lite0 peers (no teacher) | ema1 |" in (tmp_path / "results.md").read_text()


def test_detection_curve_keeps_the_last_entry_of_a_resumed_iteration(tmp_path):
    """A resumed run re-logs the iterations after its last checkpoint; the curve draws each once,
    with the values of the run that continued, and leaves KD terms out of the sum."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_study", f"{REPO}/tools/run_study.py")
    run_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_study)

    def entry(it, v):
        losses = {k: v for k in run_study.DETECTION_LOSSES}
        return json.dumps(dict(losses, iteration=it, loss_kd_fpn_p2=100.0))

    lines = [entry(0, 1.0), entry(1, 0.9), entry(1, 0.5), entry(2, 0.4), '{"bbox/AP": 3.0}']
    (tmp_path / "metrics.json").write_text("\n".join(lines) + "\n")
    its, vals = run_study._detection_curve(str(tmp_path / "metrics.json"))
    assert its == [0, 1, 2]
    assert vals == pytest.approx(
        [4.0, 2.0, 1.6]
    )  # 4 detection losses each; the re-logged iteration 1 wins
    assert run_study._detection_curve(str(tmp_path / "missing.json")) == ([], [])
