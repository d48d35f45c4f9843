"""Fault injection around a run's output folder: extending a finished run, a full disk during a
save, SIGTERM/SIGINT, two runs in one folder, an OUTPUT_DIR that is a file, and ``--resume`` with
a changed config or without a checkpoint.

Every case asserts what a user would otherwise lose or be told wrongly: the bytes of complete
checkpoints before and after, the iteration a file really holds, and a message that names the
file, key or process and the fix. Most cases use an ``nn.Linear`` behind the real checkpointer;
the command-line cases run ``tools/train_net.py`` as a user does and stop before training.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import CONFIGS, REPO, file_digests, tiny_overrides
from kd_det.checkpoint import load_checkpoint
from kd_det.engine.checkpoint import AtomicDetectionCheckpointer, CheckpointSaveError
from kd_det.utils.testing import run_tool

R18 = os.path.join(CONFIGS, "Synthetic", "faster_rcnn_R18_FPN.yaml")


def _finished_run(d, iteration=3):
    model = nn.Linear(3, 2)
    AtomicDetectionCheckpointer(model, save_dir=str(d)).save("model_final", iteration=iteration)
    return d


# ------------------------------------------------------------------------------------------------
# extending a finished run: the new weights are saved, the old final is kept aside
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved_iteration,kept_as_is", [(3, True), (9, False)])
def test_resumed_final_is_replaced_unless_it_holds_this_iteration(
    tmp_path, kd_log, saved_iteration, kept_as_is
):
    d = _finished_run(tmp_path)
    before = file_digests(d)["model_final.pth"]
    model = nn.Linear(3, 2)
    ckpt = AtomicDetectionCheckpointer(model, save_dir=str(d))
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 3
    with torch.no_grad():
        model.weight.fill_(7.0)  # "trained on"
    ckpt.save("model_final", iteration=saved_iteration)
    after = file_digests(d)
    aside = [n for n in after if n.startswith("model_final.pth.bak-")]
    if kept_as_is:
        assert after["model_final.pth"] == before and not aside
    else:
        assert len(aside) == 1 and after[aside[0]] == before  # moved aside, never deleted
        final = load_checkpoint(str(d / "model_final.pth"))
        assert final["iteration"] == 9 and torch.all(final["model"]["weight"] == 7.0)
        assert "holds iteration 3, where this run resumed and trained on" in kd_log.text
    assert (d / "last_checkpoint").read_text() == "model_final.pth"


def test_extending_a_finished_run_trains_saves_and_reports_the_new_weights(
    tmp_path, synthetic_root
):
    """train MAX_ITER 2, then --resume with MAX_ITER 3: iteration 2 is trained and saved."""
    from kd_det.config import get_kd_cfg
    from kd_det.data.builtin import register_datasets_from_config
    from kd_det.engine import KDTrainer

    out = tmp_path / "run"

    def run(max_iter, resume):
        cfg = get_kd_cfg()
        cfg.merge_from_file(R18)
        cfg.merge_from_list(tiny_overrides(out, synthetic_root, max_iter=max_iter, batch=1))
        cfg.merge_from_list(["DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "100"])
        cfg.freeze()
        register_datasets_from_config(cfg)
        trainer = KDTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        start = trainer.start_iter
        trainer.train()
        return start

    assert run(2, False) == 0
    first = file_digests(out)["model_final.pth"]
    assert run(3, True) == 2
    final = load_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == 2
    aside = [n for n in os.listdir(out) if n.startswith("model_final.pth.bak-")]
    assert len(aside) == 1 and file_digests(out)[aside[0]] == first
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


# ------------------------------------------------------------------------------------------------
# a full disk during a save
# ------------------------------------------------------------------------------------------------

DISK_ERRORS = {
    "torch_enforce_fail": RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048"
    ),
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
}


@pytest.mark.parametrize("error", sorted(DISK_ERRORS))
@pytest.mark.parametrize("name", ["model_0000005", "model_final"])
def test_full_disk_during_save_says_the_previous_checkpoint_is_intact(
    tmp_path, monkeypatch, error, name
):
    d = _finished_run(tmp_path)  # model_final.pth (iteration 3), tagged
    ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(d))
    ckpt.resume_or_load("", resume=True)
    before = file_digests(d)

    def full_disk(obj, f, *a, **k):
        f.write(b"the first blocks of a checkpoint")
        raise DISK_ERRORS[error]

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(name, iteration=9)
    msg = str(info.value)
    assert f"Could not write checkpoint '{d / (name + '.pth')}'" in msg
    assert f"Nothing was replaced: the previous checkpoint {d / 'model_final.pth'} is intact" in msg
    assert "continue with --resume" in msg
    assert file_digests(d) == before  # no partial file, no temporary file, nothing renamed


# ------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: the checkpoint being written is finished (or abandoned safely)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def interrupt_handlers():
    from kd_det.engine.interrupt import install_interrupt_handlers

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    install_interrupt_handlers()
    yield
    for s, h in old.items():
        signal.signal(s, h)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("times", [1, 2], ids=["once_finishes", "twice_abandons"])
def test_signal_during_a_save(tmp_path, monkeypatch, interrupt_handlers, signum, times):
    from kd_det.engine.interrupt import RunInterrupted

    d = _finished_run(tmp_path)
    before = file_digests(d)
    ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 2), save_dir=str(d))
    real_save = torch.save

    def signalled_save(obj, f, *a, **k):
        for _ in range(times):
            os.kill(os.getpid(), signum)  # handled right here, in the main thread
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", signalled_save)
    with pytest.raises(RunInterrupted):
        ckpt.save("model_0000005", iteration=5)
    leftovers = [n for n in os.listdir(d) if n.endswith(".tmp")]
    assert not leftovers
    if times == 1:  # finished: complete and tagged
        assert load_checkpoint(str(d / "model_0000005.pth"))["iteration"] == 5
        assert (d / "last_checkpoint").read_text() == "model_0000005.pth"
    else:  # abandoned: as if it never started
        assert file_digests(d) == before


def test_resume_hint_names_the_checkpoint_and_the_exact_command(tmp_path):
    from kd_det.engine.interrupt import resume_hint

    d = _finished_run(tmp_path)
    argv = ["tools/train_net.py", "--config-file", "my config.yaml", "SOLVER.MAX_ITER", "9"]
    hint = resume_hint(str(d), signal.SIGTERM, argv)
    assert f"Stopped by SIGTERM. The last complete checkpoint is {d / 'model_final.pth'}." in hint
    assert hint.endswith(
        f"{sys.executable} tools/train_net.py --resume --config-file 'my config.yaml' "
        "SOLVER.MAX_ITER 9"
    )
    empty = resume_hint(str(tmp_path / "nothing"), signal.SIGINT, argv + ["--resume"])
    assert "No checkpoint was written yet" in empty and empty.count("--resume") == 1


def test_sigterm_stops_training_with_the_resume_command(tmp_path, synthetic_root):
    out = tmp_path / "run"
    args = ["--config-file", R18] + tiny_overrides(out, synthetic_root, max_iter=500, batch=1)
    args += ["SOLVER.CHECKPOINT_PERIOD", "1", "KD_TRAINER.MAX_TO_KEEP", "2", "DATASETS.TEST", "()"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tools", "train_net.py")] + args,
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "model_0000001.pth").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "Stopped by SIGTERM. The last complete checkpoint is" in stderr
    assert f"train_net.py --resume --config-file {R18}" in stderr
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    tag = (out / "last_checkpoint").read_text()
    assert load_checkpoint(str(out / tag))["iteration"] >= 1


# ------------------------------------------------------------------------------------------------
# one run per OUTPUT_DIR; OUTPUT_DIR that is a file
# ------------------------------------------------------------------------------------------------


def test_a_live_lock_is_refused_with_the_holder_and_a_killed_one_is_not_stuck(tmp_path):
    from kd_det.engine.run_lock import OutputDirInUseError, OutputDirLock

    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.write(fd, f'pid: {os.getpid()}\\nhost: elsewhere\\n'.encode()); print('locked', "
         "flush=True); time.sleep(600)", str(out / ".kd_det_run.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out.mkdir()
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError) as info:
            OutputDirLock(str(out)).acquire()
        msg = str(info.value)
        assert f"is in use by a live run (pid {holder.pid} on host elsewhere" in msg
        assert "give this one another OUTPUT_DIR" in msg
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with OutputDirLock(str(out)) as lock:
        assert lock.held
        assert f"pid: {os.getpid()}" in (out / ".kd_det_run.lock").read_text()


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_output_dir_that_is_a_file_is_named(tmp_path, where):
    from kd_det.engine.run_lock import OutputDirError, OutputDirLock

    blocker = tmp_path / "results"
    blocker.write_text("x")
    out = blocker if where == "is_a_file" else blocker / "run"
    with pytest.raises(OutputDirError, match=f"OUTPUT_DIR '{out}' (is a file|lies under the file)"):
        OutputDirLock(str(out)).acquire()
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("fault", ["locked", "output_dir_is_a_file"])
def test_train_net_refuses_a_folder_it_cannot_use(tmp_path, fault):
    from kd_det.engine.run_lock import OutputDirLock

    out = tmp_path / "run"
    lock = None
    if fault == "locked":
        lock = OutputDirLock(str(out)).acquire()  # this test process is the live run
    else:
        out.write_text("not a folder")
    try:
        proc = run_tool(REPO, "train_net.py", ["--config-file", R18] + tiny_overrides(out))
    finally:
        if lock is not None:
            lock.release()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if fault == "locked":
        assert f"is in use by a live run (pid {os.getpid()} on host" in proc.stderr
        assert sorted(os.listdir(out)) == [".kd_det_run.lock"]  # no config.yaml, no log.txt
    else:
        assert f"OUTPUT_DIR '{out}' is a file" in proc.stderr


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_run(tmp_path):
    """Data-loader workers are forked: when the run is killed they live on for seconds, and a
    flock they inherited would keep OUTPUT_DIR locked."""
    from kd_det.engine.run_lock import OutputDirInUseError, OutputDirLock

    out = tmp_path / "run"
    code = (
        "import os, sys, time; from kd_det.engine.run_lock import OutputDirLock; "
        "OutputDirLock(sys.argv[1]).acquire(); child = os.fork(); "
        "print(child if child else '', flush=True); time.sleep(600)"
    )
    run = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    worker = None
    try:
        worker = int(run.stdout.readline())
        with pytest.raises(OutputDirInUseError, match=f"pid {run.pid} "):
            OutputDirLock(str(out)).acquire()
        run.kill()
        run.wait()
        os.kill(worker, 0)  # the forked child still lives ...
        with OutputDirLock(str(out)) as lock:  # ... and holds nothing
            assert lock.held
    finally:
        if run.poll() is None:
            run.kill()
        if worker:
            os.kill(worker, signal.SIGKILL)
