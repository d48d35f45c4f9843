"""tools/demo.py end to end at tiny size: three trainings, a table, reuse on the second call."""

import json
import os
import subprocess
import sys

from conftest import REPO

# A 2-iteration teacher is useless: --teacher-min-ap 0 makes the teacher check only log its AP.
ARGS = ["--num-train", "8", "--num-val", "4", "--image-size", "64", "--teacher-iters", "2",
        "--student-iters", "2", "--batch", "2", "--teacher-min-ap", "0",
        "--tuned", "/nonexistent"]  # fmt: skip


def test_demo_tiny(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "tools", "demo.py"), "--output", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + ARGS, capture_output=True, text=True, cwd=REPO, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.load(open(tmp_path / "results.json"))
    for k in (res["teacher"], res["student"], res["distilled"]["ssim"]):
        assert set(k) >= {"AP", "AP50", "APs", "APm", "APl"}
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and "student + SSIM KD" in md  # header + 3 rows
    assert set(res["distilled"]) == {"ssim"}  # no tuned configs given: the shipped SSIM config
    for run in ("teacher_lite2", "student_lite0", "student_lite0_ssim"):
        assert (tmp_path / run / "metrics.json").exists()
        assert (tmp_path / run / "model_final.pth").exists()
    kd_metrics = (tmp_path / "student_lite0_ssim" / "metrics.json").read_text()
    assert "loss_kd_fpn_p2" in kd_metrics
    assert (tmp_path / "student_lite0_ssim" / "teacher_check.json").exists()
    assert (tmp_path / "compare.png").stat().st_size > 0  # ground truth + 3 models side by side

    again = subprocess.run(
        cmd + ARGS, capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the finished run") == 3


def test_demo_shows_the_studys_best_method_and_ssim(tmp_path, monkeypatch):
    from kd_det.utils.testing import load_tool

    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    export = load_tool(REPO, "export_tuned_configs.py")
    demo = load_tool(REPO, "demo.py")
    size = ["MODEL.FPN.OUT_CHANNELS", "64"]
    run = lambda opts, dev: {"runs": [{"opts": size + opts, "dev": {"AP": dev}}]}  # noqa: E731
    results = {"methods": {
        "student": dict(run([], 20.0), label="student alone"),
        "multilevel": dict(run(["MODEL.KD.ROI.CLS_WEIGHT", "0.5"], 25.0), label="+ multi-level"),
        "ssim": dict(run(["MODEL.KD.SSIM.WINDOW_SIZE", "7"], 22.0), label="+ SSIM"),
    }}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    tuned = tmp_path / "tuned"
    export.main(["--study", str(tmp_path / "results.json"), "--output", str(tuned)])
    methods = demo.demo_methods(str(tuned))
    assert list(methods) == ["student", "multilevel", "ssim"]  # the best by dev AP, then SSIM
    assert methods["multilevel"][1] == str(tuned / "multilevel.yaml") and methods["ssim"][2]
    assert "best in the study" in methods["multilevel"][0]
    assert methods["student"][1] == str(tuned / "student.yaml")
