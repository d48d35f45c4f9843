"""SIGTERM and SIGINT: finish the checkpoint being written (or abandon it safely), then stop and
say how to resume.

Python's default SIGTERM kills the process where it stands; a pre-empted job then leaves a
temporary file and prints nothing. :func:`install_interrupt_handlers` turns both signals into
:class:`RunInterrupted` (a ``KeyboardInterrupt``, so detectron2's loop does not log it as a crash)
raised in the main thread, except inside :func:`finish_before_interrupt`: a checkpoint save
completes first and the run stops right after it. A second signal during the save abandons it --
the write goes to a temporary file, so the previous checkpoint stays intact either way.
:func:`resume_hint` is the message ``tools/train_net.py`` prints: the last complete checkpoint and
the exact command that continues the run.
"""

import contextlib
import logging
import os
import shlex
import signal
import sys

logger = logging.getLogger(__name__)

__all__ = [
    "RunInterrupted",
    "finish_before_interrupt",
    "install_interrupt_handlers",
    "received_signal",
    "resume_command",
    "resume_hint",
]

_STATE = {"deferring": 0, "pending": None, "received": None}


class RunInterrupted(KeyboardInterrupt):
    """The run received SIGTERM or SIGINT (``signum``)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, frame):
    _STATE["received"] = signum
    if _STATE["deferring"] and _STATE["pending"] is None:
        _STATE["pending"] = signum
        logger.warning(
            f"{signal.Signals(signum).name} received while a checkpoint is being written: "
            "finishing it, then stopping (send it again to abandon the write; the previous "
            "checkpoint stays intact either way)."
        )
        return
    raise RunInterrupted(signum)


def install_interrupt_handlers(signums=(signal.SIGTERM, signal.SIGINT)):
    """Handle ``signums`` as described in the module docstring (call from the main thread)."""
    for s in signums:
        signal.signal(s, _handler)
    _STATE.update(deferring=0, pending=None, received=None)


def received_signal():
    """The signal number this process received since the handlers were installed, else None."""
    return _STATE["received"]


@contextlib.contextmanager
def finish_before_interrupt():
    """Inside the block a first SIGTERM/SIGINT waits; it is raised when the block ends."""
    _STATE["deferring"] += 1
    try:
        yield
    finally:
        _STATE["deferring"] -= 1
        pending = _STATE["pending"]
        if not _STATE["deferring"] and pending is not None:
            _STATE["pending"] = None
            raise RunInterrupted(pending)


def resume_command(argv=None):
    """The command line that continues this run: the same arguments plus ``--resume``."""
    argv = list(sys.argv if argv is None else argv)
    if "--resume" not in argv:
        argv.insert(1, "--resume")
    return shlex.join([sys.executable] + argv)


def resume_hint(output_dir, signum, argv=None):
    """What an interrupted run prints: why it stopped, what is saved, how to continue."""
    tag = os.path.join(output_dir, "last_checkpoint")
    try:
        with open(tag) as f:
            last = os.path.join(output_dir, f.read().strip())
    except OSError:
        last = ""
    saved = (
        f"The last complete checkpoint is {last}."
        if last and os.path.isfile(last)
        else "No checkpoint was written yet, so a resumed run starts at iteration 0."
    )
    return (
        f"Stopped by {signal.Signals(signum).name}. {saved} Resume with (from {os.getcwd()}):\n"
        f"  {resume_command(argv)}"
    )
