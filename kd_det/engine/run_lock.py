"""One run per output folder: a lock that a killed run cannot leave stuck.

Two runs writing into one ``OUTPUT_DIR`` both exit 0, but the first run's ``final_results.json`` is
overwritten, ``metrics.json`` interleaves both, and their checkpoints replace each other.
``tools/train_net.py`` therefore holds :class:`OutputDirLock` for as long as it runs (training and
evaluation alike: both write there).

The lock is ``fcntl.flock`` on ``OUTPUT_DIR/.kd_det_run.lock``. The kernel releases it when the
holding process exits, however it exits (``kill -9`` and out-of-memory kills included), so there is
never a stale lock to delete. A ``flock`` is shared by every process that inherits its descriptor,
so a forked child (a data-loader worker outliving a killed run by seconds) would keep it: forked
children close their copy at once (``os.register_at_fork``). The file itself stays, holding who
took the lock last (pid, host, start time, command line), which a refused run reports. ``flock``
works on local file systems and on NFSv4; on file systems without locks the run goes ahead with a
warning. :func:`guard_run` bundles the lock with ``--resume``'s config check, for a script of
one's own around ``KDTrainer``; a ``KDTrainer`` whose script took no lock takes it for its
training loop (:func:`run_lock`). The holder names its folder in :data:`HELD_ENV`, so the
processes it starts (``detectron2.engine.launch``'s workers) know the folder is theirs.
"""

import contextlib
import errno
import logging
import os
import shlex
import socket
import sys
import time

logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "OutputDirError",
    "OutputDirInUseError",
    "OutputDirLock",
    "check_output_dir",
    "guard_run",
    "run_lock",
]

LOCK_NAME = ".kd_det_run.lock"

_HELD = set()  # descriptors of the locks this process holds
#: The folder whose lock this process, or the process that started it, holds (set by
#: :meth:`OutputDirLock.acquire`, inherited by child processes, cleared by ``release``).
HELD_ENV = "KD_DET_RUN_LOCK"


def _close_inherited():
    """In a forked child: drop the copies of the parent's lock descriptors (the lock is the
    parent's, and must end with it)."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


class OutputDirError(ValueError):
    """``OUTPUT_DIR`` cannot be a folder (it is a file, or lies under one)."""


class OutputDirInUseError(RuntimeError):
    """Another live run holds the lock of ``OUTPUT_DIR``."""


def _example(key):
    return f"{key}=output/my_run" if "." in key else f"{key} output/my_run"


def check_output_dir(path, key="OUTPUT_DIR"):
    """Refuse an ``OUTPUT_DIR`` that is, or lies under, an existing file; ``key`` is how the
    config names it (``train.output_dir`` in a LazyConfig).

    Raises:
        OutputDirError: naming the file and the key.
    """
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        where = "is a file" if probe == os.path.abspath(path) else f"lies under the file '{probe}'"
        raise OutputDirError(
            f"{key} '{path}' {where}; runs write their checkpoints, logs and results into a "
            f"folder. Set {key} to a folder path (e.g. {_example(key)})."
        )


class OutputDirLock:
    """An exclusive lock on an output folder, held until :meth:`release` or process exit.

    Args:
        output_dir (str): the folder (created if needed).
        key (str): how the config names it, for the messages (``train.output_dir`` in a
            LazyConfig).
    """

    def __init__(self, output_dir, key="OUTPUT_DIR"):
        self.output_dir, self.key = output_dir, key
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd = None

    def acquire(self):
        """Take the lock, or raise :class:`OutputDirInUseError` naming the holder.

        Returns:
            OutputDirLock: ``self``.
        """
        import fcntl

        check_output_dir(self.output_dir, self.key)
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirInUseError(self._in_use_message()) from None
            logger.warning(
                f"Cannot lock {self.key} '{self.output_dir}' ({e.strerror}; the file system may "
                "not support locks): nothing stops a second run from writing into it."
            )
            return self
        os.ftruncate(fd, 0)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": shlex.join([sys.executable] + sys.argv),
        }
        os.write(fd, "".join(f"{k}: {v}\n" for k, v in holder.items()).encode())
        self._fd = fd
        _HELD.add(fd)
        os.environ[HELD_ENV] = os.path.abspath(self.output_dir)
        return self

    def _in_use_message(self):
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                holder = dict(line.split(": ", 1) for line in f.read().splitlines() if ": " in line)
        except OSError:
            holder = {}
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')}"
        )
        return (
            f"{self.key} '{self.output_dir}' is in use by a live run ({who}). Two runs in one "
            "folder overwrite each other's checkpoints, metrics.json and results. Wait for that "
            f"run to end, or give this one another {self.key}. (Its lock, "
            f"{self.path}, is released when that process exits, even if it is killed: there is "
            "nothing to delete.)"
        )

    def release(self):
        """Give the lock up (also done by the kernel when the process exits)."""
        if self._fd is not None:
            import fcntl

            _HELD.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if os.environ.get(HELD_ENV) == os.path.abspath(self.output_dir):
                del os.environ[HELD_ENV]

    @property
    def held(self):
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def guard_run(cfg, resume=False, allow_config_change=False):
    """What ``tools/train_net.py`` checks before a run starts, for a script of one's own around
    :class:`~kd_det.engine.KDTrainer`: no live run uses ``cfg.OUTPUT_DIR`` (its lock is taken)
    and, with ``resume``, the config matches the run's ``OUTPUT_DIR/config.yaml``
    (:func:`~kd_det.engine.resume_check.check_resume_config`). Call it once, in the process that
    starts the run and before ``default_setup`` rewrites ``config.yaml``, and keep the lock for
    the whole run.

    Returns:
        tuple[OutputDirLock, list[str]]: the held lock, and the resume check's lines to log.

    Raises:
        OutputDirInUseError, OutputDirError, ResumeConfigError: nothing is held then.
    """
    from kd_det.config import get_kd_cfg

    from .resume_check import check_resume_config

    lock = OutputDirLock(cfg.OUTPUT_DIR).acquire()
    try:
        changes = check_resume_config(cfg, allow_config_change, get_kd_cfg()) if resume else []
    except BaseException:
        lock.release()
        raise
    return lock, changes


@contextlib.contextmanager
def run_lock(output_dir):
    """Hold ``output_dir``'s lock for the block, unless this run holds it already: this process
    or the process that started it (``tools/train_net.py``, :func:`guard_run`) took it
    (:data:`HELD_ENV`). ``KDTrainer.train`` runs in it, so a script of one's own that calls no
    :func:`guard_run` cannot train into a folder a live run uses.

    Raises:
        OutputDirInUseError, OutputDirError: before the block runs.
    """
    if os.environ.get(HELD_ENV) == os.path.abspath(output_dir):
        yield None
        return
    lock = OutputDirLock(output_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
