"""guard_run: tools/train_net.py's checks before a run, for a script of one's own around KDTrainer.

The lock itself, and its behaviour when a run is killed, is tested as the user meets it in
test_fault_injection_run.py; here, what a custom script gets from one call."""

import pytest

from kd_det.config import get_kd_cfg
from kd_det.engine.resume_check import ResumeConfigError
from kd_det.engine.run_lock import OutputDirInUseError, OutputDirLock, guard_run


def _cfg(out, loss="mse"):
    cfg = get_kd_cfg()
    cfg.OUTPUT_DIR = str(out)
    cfg.MODEL.KD.FEATURE.LOSS = loss
    return cfg


def test_guard_run_holds_the_folder_for_one_run(tmp_path):
    out = tmp_path / "run"
    lock, changes = guard_run(_cfg(out))
    assert lock.held and changes == []
    with pytest.raises(OutputDirInUseError, match="is in use by a live run"):
        guard_run(_cfg(out))  # a second run while the first holds it
    lock.release()
    guard_run(_cfg(out))[0].release()  # free again once the first has ended


def test_guard_run_checks_a_resume_and_holds_nothing_when_it_refuses(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(_cfg(out, "mse").dump())  # as default_setup writes it
    with pytest.raises(ResumeConfigError, match="MODEL.KD.FEATURE.LOSS"):
        guard_run(_cfg(out, "ssim"), resume=True)
    with OutputDirLock(str(out)):  # the refused call left the folder free
        pass
    # Without resume, or with the user's consent, the changed config goes ahead.
    guard_run(_cfg(out, "ssim"))[0].release()
    lock, changes = guard_run(_cfg(out, "ssim"), resume=True, allow_config_change=True)
    assert lock.held and any("MODEL.KD.FEATURE.LOSS" in c for c in changes)
    lock.release()
