"""kd_det.utils.loss_balance and tools/loss_balance.py: distillation-to-detection ratios from a
run's metrics.json, checked by hand."""

import json

import pytest
from conftest import REPO
from kd_det.utils import loss_balance as lb
from kd_det.utils.testing import run_tool


def _write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.json", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _row(it, kd, det=1.0):
    # Detection terms sum to ``det``; two kd terms sum to ``kd`` (the second one is the larger).
    return {"iteration": it, "loss_cls": det / 2, "loss_rpn_cls": det / 2,
            "loss_kd_fpn_p2": kd / 4, "loss_kd_fpn_p3": 3 * kd / 4, "lr": 0.01}  # fmt: skip


def test_ratios_per_window_match_a_hand_computation(tmp_path):
    rows = [{"iteration": 0, "teacher_check/AP": 40.0}]  # no loss: skipped
    rows += [_row(it, kd=float(k)) for k, it in enumerate(range(19, 200, 20))]  # 10 rows, kd 0..9
    rows += [{"iteration": 199, "bbox/AP": 30.0}]
    rows += [_row(199, kd=12.0, det=2.0)]  # a resumed run logged iteration 199 again: it wins
    _write(tmp_path / "run", rows)
    b = lb.balance(str(tmp_path / "run" / "metrics.json"), window=0.2)
    # Two rows per window: start kd 0, 1 (ratios 0, 1); middle rows 4, 5 (kd 4, 5); end rows 8
    # (kd 8, det 1) and the re-logged 199 (12 / 2 = 6).
    assert b["iterations"] == 200
    assert b["start"] == pytest.approx(0.5)
    assert b["middle"] == pytest.approx(4.5)
    assert b["end"] == pytest.approx(7.0)
    term, value = b["largest"]
    assert term == "loss_kd_fpn_p3" and value == pytest.approx((3 * 8 / 4 + 3 * 12 / 4) / 2)
    assert b["detection_end"] == pytest.approx((1.0 + 2.0) / 2)  # kd terms left out


def test_detection_loss_of_an_online_run_is_peer0s(tmp_path):
    row = {"iteration": 9, "loss_peer0_cls": 0.5, "loss_peer0_box_reg": 0.25, "loss_peer1_cls": 4.0,
           "loss_kd_peer0_fpn_p2_from_peer1": 9.0}  # fmt: skip
    assert lb.member_detection_loss(row) == pytest.approx(0.75)
    # The meta-weight network's objective trains no detector: neither kd nor detection.
    dyn = {"loss_cls": 0.5, "loss_hint_meta": 3.0, "loss_kd_fpn_p2": 1.0}
    assert lb.member_detection_loss(dyn) == pytest.approx(0.5)
    assert lb.ratio(dyn) == pytest.approx(2.0)
    _write(tmp_path / "o", [row])
    assert lb.balance(str(tmp_path / "o" / "metrics.json"))["detection_end"] == pytest.approx(0.75)


def test_a_run_without_distillation_has_ratio_zero(tmp_path):
    _write(tmp_path / "s", [{"iteration": i, "loss_cls": 1.0} for i in range(5)])
    b = lb.balance(str(tmp_path / "s" / "metrics.json"))
    assert b["start"] == b["end"] == 0.0 and b["largest"] is None


def test_study_mode_marks_each_familys_pick(tmp_path):
    study = tmp_path / "study"
    for trial, kd in (("w1.0", 1.0), ("w3.0", 3.0)):
        _write(study / "runs" / "dev" / "mse" / trial / "seed0", [_row(i, kd) for i in range(10)])
    (study / "results.json").write_text(json.dumps({"dev_sweep": {"mse": {"pick": "w3.0"}}}))
    out = run_tool(REPO, "loss_balance.py", ["--study", study], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| mse/w1.0 | 10 | 1.00 | 1.00 | 1.00 | loss_kd_fpn_p3 0.750 |" in out.stdout
    assert "| mse/w3.0 * | 10 | 3.00 |" in out.stdout


def test_a_directory_without_metrics_is_named(tmp_path):
    out = run_tool(REPO, "loss_balance.py", [tmp_path], timeout=120)
    assert out.returncode != 0 and "has no metrics.json" in out.stderr
    out = run_tool(REPO, "loss_balance.py", ["--study", tmp_path, "--window", "0.5"], timeout=120)
    assert out.returncode != 0 and "--window must be in (0, 1/3]" in out.stderr
