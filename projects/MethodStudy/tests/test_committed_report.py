"""The committed study report is what its committed ledger rebuilds, byte for byte.

The ledger keys each run by its parameters, the config files' digest included
(``kd_det.utils.runs.config_digest``), so an edit to a config the study trained with, even to a
comment, makes the report stop reusing those runs. This test is the guard: such an edit fails
here, and the author either reverts it or retrains the runs on purpose.
"""

import pathlib
import shutil

from method_study import RESULTS
from method_study.testing import run_module

STUDY = pathlib.Path(RESULTS)
REPORTS = ["results.md", "results.json", "dev_sweep.md", "regime.md"]


def test_report_rebuilt_from_the_ledger_is_byte_identical(tmp_path):
    out = tmp_path / "results"
    shutil.copytree(STUDY, out, ignore=shutil.ignore_patterns("runs", "data"))
    proc = run_module("run_study", ["--report-only", "--output", out], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing its ledger record" in proc.stdout
    for name in REPORTS:
        rebuilt, committed = (out / name).read_bytes(), (STUDY / name).read_bytes()
        assert rebuilt == committed, f"{name} differs from the committed one"


def test_ssim_diagnosis_report_rebuilt_from_its_ledger_is_byte_identical(tmp_path):
    """The SSIM diagnosis's report too: its documented rebuild (``--report-only``, no other
    option) gives the committed tables, the variants settled on test in their committed order."""
    diag = STUDY / "ssim_diagnosis"
    out = tmp_path / "ssim_diagnosis"
    shutil.copytree(diag, out, ignore=shutil.ignore_patterns("runs", "data"))
    proc = run_module("ssim_diagnosis", ["--report-only", "--output", out], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.md", "results.json"):
        rebuilt, committed = (out / name).read_bytes(), (diag / name).read_bytes()
        assert rebuilt == committed, f"ssim_diagnosis/{name} differs from the committed one"
