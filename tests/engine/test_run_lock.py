"""guard_run: tools/train_net.py's checks before a run, for a script of one's own around KDTrainer.

The lock itself, and its behaviour when a run is killed, is tested as the user meets it in
test_fault_injection_run.py; here, what a custom script gets from one call."""

import os

import pytest
from detectron2.engine import HookBase

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


def _live_holder(out):
    """Another process holding ``out``'s lock, as a live run elsewhere does."""
    import subprocess
    import sys

    code = (
        "import sys, time; from kd_det.engine.run_lock import OutputDirLock; "
        "OutputDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_trainer_whose_script_took_no_lock_takes_it_for_training(
    tmp_path, synthetic_root, monkeypatch
):
    """A script of one's own that never calls guard_run: KDTrainer.train refuses a folder a live
    run uses before the first step (nothing written), and trains once the folder is free,
    holding the lock while it does."""
    from conftest import R18, tiny_overrides
    from kd_det.data.builtin import register_datasets_from_config
    from kd_det.engine import KDTrainer
    from kd_det.engine.run_lock import HELD_ENV

    monkeypatch.delenv(HELD_ENV, raising=False)
    out = tmp_path / "run"
    cfg = get_kd_cfg()
    cfg.merge_from_file(R18)
    cfg.merge_from_list(tiny_overrides(out, synthetic_root, max_iter=2))
    cfg.freeze()
    register_datasets_from_config(cfg)
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    holder = _live_holder(out)
    try:
        with pytest.raises(OutputDirInUseError, match=f"pid {holder.pid} "):
            trainer.train()
    finally:
        holder.kill()
        holder.wait()
    # Nothing trained or saved (the trainer's writers open metrics.json, to append, when built).
    assert not list(out.glob("*.pth")) and (out / "metrics.json").read_text() == ""
    seen = []
    trainer.register_hooks([_HoldsLock(out, seen)])
    trainer.train()
    assert (out / "model_final.pth").exists() and seen == [True]
    assert HELD_ENV not in os.environ  # released when training ended
    with OutputDirLock(str(out)):  # ... and the folder is free again
        pass


def test_a_folder_the_starting_process_holds_is_not_locked_twice(tmp_path, monkeypatch):
    """launch()'s workers inherit HELD_ENV from tools/train_net.py, which holds the lock: their
    trainer must not wait for, or be refused by, its own run's lock."""
    from kd_det.engine.run_lock import HELD_ENV, run_lock

    out = tmp_path / "run"
    holder = _live_holder(out)  # stands for the process that started this one
    try:
        monkeypatch.setenv(HELD_ENV, str(out.resolve()))
        with run_lock(str(out)) as lock:
            assert lock is None
        monkeypatch.setenv(HELD_ENV, str(tmp_path / "another_run"))
        with pytest.raises(OutputDirInUseError):
            with run_lock(str(out)):
                pass
    finally:
        holder.kill()
        holder.wait()


class _HoldsLock(HookBase):
    """A hook that records, at the first step, whether another process is refused the folder."""

    def __init__(self, out, seen):
        self.out, self.seen = out, seen

    def before_step(self):
        if not self.seen:
            import subprocess
            import sys

            code = ("import sys; from kd_det.engine.run_lock import OutputDirLock; "
                    "OutputDirLock(sys.argv[1]).acquire()")  # fmt: skip
            proc = subprocess.run([sys.executable, "-c", code, str(self.out)],
                                  capture_output=True, text=True)  # fmt: skip
            self.seen.append("is in use by a live run" in proc.stderr)
