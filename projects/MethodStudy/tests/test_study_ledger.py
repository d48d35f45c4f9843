"""method_study.ledger: records mirror runs/, reuse needs equal parameters, restores are exact."""

import json

import pytest

from method_study import ledger as ledger_module
from method_study import report
from method_study.run_study import check_teacher


@pytest.fixture(scope="module")
def ledger():
    return ledger_module


def test_record_path_mirrors_runs(ledger, tmp_path):
    out = tmp_path / "runs" / "dev" / "ssim" / "win7" / "seed0"
    assert ledger.record_path(str(tmp_path), str(out)) == str(
        tmp_path / "ledger" / "dev" / "ssim" / "win7" / "seed0.json"
    )
    with pytest.raises(ValueError, match="not under"):
        ledger.record_path(str(tmp_path), str(tmp_path / "elsewhere"))


def test_save_merges_and_load_checks_params(ledger, tmp_path):
    path = str(tmp_path / "ledger" / "final" / "mse" / "seed1.json")
    ledger.save(path, params={"seed": 1}, dev={"AP": 31.5}, seconds=900.0)
    rec = ledger.save(path, test={"AP": 32.8})  # a later test evaluation keeps the rest
    assert rec == {"params": {"seed": 1}, "dev": {"AP": 31.5}, "seconds": 900.0,
                   "test": {"AP": 32.8}}  # fmt: skip
    assert ledger.load(path, {"seed": 1}) == rec
    assert ledger.load(path, {"seed": 2}) is None  # other parameters: not this run
    assert ledger.load(str(tmp_path / "missing.json")) is None
    assert not list(tmp_path.rglob("*.tmp*"))  # written atomically, nothing left behind
    with pytest.raises(ValueError, match="unknown ledger fields"):
        ledger.save(path, weights="model_final.pth")


def test_identity_is_stable_and_order_free(ledger):
    a = ledger.identity({"seed": 42, "iters": 3000})
    assert a == ledger.identity({"iters": 3000, "seed": 42}) and len(a) == 16
    assert a != ledger.identity({"seed": 43, "iters": 3000})


def test_restored_fields_from_results_json(ledger):
    results = {
        "teacher": {"dev": {"AP": 39.6}, "test": {"AP": 38.2}, "seconds": 4230.0, "curve": [[1, 2]],
                    "extra": 1},
        "dev_sweep": {"ssim": {"trials": [
            {"name": "win7", "dev_AP": 31.9, "seconds": 1200.0, "curve": [[1000, 31.9]]},
            {"name": "win3", "dev_AP": None, "seconds": None, "curve": None}]}},
        "methods": {
            "ssim": {"runs": [
                {"seed": 0, "out": "runs/dev/ssim/win7/seed0", "reused_dev_trial": "ssim/win7",
                 "dev": {"AP": 31.9, "AP50": 50.0}, "test": {"AP": 31.4},
                 "train_detection_loss_end": 0.91}]},
            "student": {"runs": [
                {"seed": 2, "out": "runs/final/student/seed2", "dev": {"AP": 29.6},
                 "test": {"AP": 30.9}, "seconds": 700.0, "curve": [], "reused_dev_trial": None,
                 "train_detection_loss_end": 0.87}]}},
        "eval_noise": {"student_test_AP_bootstrap_std": {"2": 0.71}},
    }  # fmt: skip
    assert ledger.restored_fields(results, "teacher") == {
        "dev": {"AP": 39.6},
        "test": {"AP": 38.2},
        "seconds": 4230.0,
        "curve": [[1, 2]],
    }
    # A dev trial that a method reused as seed 0 takes that method's dev and test results.
    trial = ledger.restored_fields(results, "dev/ssim/win7/seed0")
    assert trial["dev"] == {"AP": 31.9, "AP50": 50.0} and trial["test"] == {"AP": 31.4}
    assert trial["seconds"] == 1200.0 and trial["train_detection_loss_end"] == 0.91
    student = ledger.restored_fields(results, "final/student/seed2")
    assert student["test"] == {"AP": 30.9} and student["test_bootstrap_std"] == 0.71
    # Unfinished or unknown runs have nothing to restore.
    assert ledger.restored_fields(results, "dev/ssim/win3/seed0") is None
    assert ledger.restored_fields(results, "final/student/seed0") is None
    assert ledger.restored_fields(results, "final/mse/seed1") is None
    json.dumps(student)  # a record is plain JSON


def test_report_never_replaces_more_evidence(tmp_path):
    written = {"teacher": {"dev": {}}, "finished_runs": 3, "methods": {"student": {}, "mse": {}},
               "dev_sweep": {"mse": {"trials": [{"dev_AP": 31.0}, {"dev_AP": None}]}}}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(written))
    assert report.finished_count(written) == 1 + 1 + 3
    fewer = dict(written, finished_runs=2)
    with pytest.raises(SystemExit, match="Refusing to overwrite .* holds 5 finished runs, this "
                                         "report only 4 .*--restore-from"):  # fmt: skip
        report.write_all(fewer, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == written  # untouched
    # A --families subset drops methods (run_study then leaves the report alone).
    assert report.drops_methods(dict(written, methods={"student": {}}), str(tmp_path))
    assert not report.drops_methods(written, str(tmp_path))


def test_a_teacher_that_does_not_reproduce_its_record_is_refused():
    """Same CPU model: bit for bit, or a stop naming --force. Another CPU model (or a record that
    names none): within TEACHER_AP_TOLERANCE the run continues with a note, beyond it stops."""
    from method_study.run_study import TEACHER_AP_TOLERANCE

    epyc, xeon = "AMD EPYC 9R14", "Intel(R) Xeon(R) Platinum 8488C"
    record = {"dev": {"AP": 39.55171057697107}, "cpu": epyc}
    assert check_teacher({"AP": 39.55171057697107}, record, cpu=epyc) is None  # bit-identical
    assert check_teacher({"AP": 12.0}, None, cpu=epyc) is None  # no record: nothing to reproduce
    with pytest.raises(RuntimeError, match=r"on the CPU model that recorded it \(AMD EPYC 9R14\)"
                       r".*--force"):  # fmt: skip
        check_teacher({"AP": 39.551710576971}, record, cpu=epyc)
    near = 39.55171057697107 + 0.5 * TEACHER_AP_TOLERANCE
    note = check_teacher({"AP": near}, record, cpu=xeon)
    assert "within the 1.0 AP allowed across CPU models" in note and xeon in note and epyc in note
    assert check_teacher({"AP": near}, {"dev": record["dev"]}, cpu=epyc) is not None  # no cpu
    with pytest.raises(RuntimeError, match=r"by more than 1.0 AP; this CPU \(Intel.*not the "
                       r"recording one \(AMD EPYC 9R14\).*--force"):  # fmt: skip
        check_teacher({"AP": 39.55171057697107 - 1.5}, record, cpu=xeon)


def test_writers_side_by_side_never_break_a_record(ledger, tmp_path):
    """Two finals can stand on one dev run and save its record at the same time (--jobs 2):
    each writer renames its own temporary file, so none fails and the record stays valid."""
    import threading

    path = str(tmp_path / "ledger" / "dev" / "ssim" / "paper" / "seed0.json")
    errors = []

    def write(k):
        try:
            for i in range(40):
                ledger.save(path, params={"seed": 0}, test={"AP": float(k * 100 + i)})
        except Exception as e:  # noqa: BLE001  (what a writer hit is the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ledger.load(path, {"seed": 0})["test"]["AP"] % 100 == 39  # some writer's last save
    assert not list(tmp_path.rglob("*.tmp*"))
