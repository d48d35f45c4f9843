"""tools/demo.py end to end at tiny size: three trainings, a table, reuse on the second call."""

import json
import os
import subprocess
import sys

from conftest import REPO
from kd_det.utils.testing import run_tool

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


def test_demo_shows_the_studys_best_method_and_ssim(tmp_path):
    """The demo reads the study's output as data (ranking.json, one config per method): the
    student alone, the best method by dev AP, then SSIM."""
    syn = os.path.join(REPO, "configs", "Synthetic")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for name, base in (("student", "faster_rcnn_lite0_FPN.yaml"),
                       ("multilevel", "distill_lite2_to_lite0_multilevel.yaml"),
                       ("ssim", "distill_lite2_to_lite0_ssim.yaml"),
                       ("mix", "faster_rcnn_lite0_FPN.yaml")):  # fmt: skip
        (tuned / f"{name}.yaml").write_text(f"_BASE_: {os.path.join(syn, base)}\n")
    ranking = [{"method": "multilevel", "label": "+ multi-level", "dev_AP": 25.0},
               {"method": "mix", "label": "+ mixing", "dev_AP": 23.0},
               {"method": "ssim", "label": "+ SSIM", "dev_AP": 22.0}]  # fmt: skip
    (tuned / "ranking.json").write_text(json.dumps(ranking))
    proc = run_tool(REPO, "demo.py", ["--tuned", tuned, "--list"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(None, 3) for line in proc.stdout.splitlines()]
    # name, teacher needed, config, label: the best by dev AP, then SSIM; mixing is not shown.
    assert [r[:2] for r in rows] == [["student", "-"], ["multilevel", "teacher"],
                                     ["ssim", "teacher"]]  # fmt: skip
    assert rows[1][2] == os.path.relpath(tuned / "multilevel.yaml", REPO)
    assert rows[1][3] == "+ multi-level [best in the study]" and rows[2][3] == "+ SSIM"
    assert rows[0][2] == os.path.relpath(tuned / "student.yaml", REPO)
