"""Crash-safe checkpointing.

fvcore's ``Checkpointer.save`` streams ``torch.save`` straight into the final file and then rewrites
the ``last_checkpoint`` tag in place. A process killed mid-write (OOM killer, pre-emption, Ctrl-C)
leaves a truncated ``model_XXXX.pth`` or ``model_final.pth`` -- or a half-written tag -- and
``--resume`` then fails or, worse, picks up a file that cannot be loaded. Here both the checkpoint
and the tag are written to a temporary file in the same directory, flushed to disk and renamed over
the target with ``os.replace``, which is atomic on POSIX and Windows: a reader sees either the old
file or the complete new one, never a partial one.

Resuming is just as careful (:meth:`AtomicDetectionCheckpointer.resume_or_load`): a missing or
truncated ``last_checkpoint`` tag, or a tag naming a missing or unreadable file, falls back to the
newest checkpoint that loads, and the log says which. A checkpoint this run did not write is never
overwritten: it is renamed aside (``<name>.pth.bak-<time>``) once the new file is complete. A
failed write (a full disk) stops with :class:`CheckpointSaveError`, the previous checkpoint intact.
"""

import contextlib
import logging
import os
import re
import tempfile
import time
import zipfile

import torch
from detectron2.engine import hooks

from kd_det.checkpoint import SafeDetectionCheckpointer

from .interrupt import finish_before_interrupt

logger = logging.getLogger(__name__)


def _current_umask():
    """The process umask (read by setting and restoring it: POSIX offers no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file next to ``path``; on success flush, fsync and rename it to ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and ``path`` keeps
    its previous content.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        # mkstemp creates 0600 files; give the result the mode open() would (0644 under umask
        # 022), so a shared teacher or a deployed export is readable like detectron2's own files.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path next to ``path`` for a writer that wants a file name (``torch.jit.save``,
    ``torch.onnx.export``); it replaces ``path`` only if the block succeeds.

    Checks may read the temporary file inside the block, so a file that fails them never takes
    the place of an earlier good one; on any exception it is removed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` that never leaves a partial ``path`` behind."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(text, path):
    """Write a small text file atomically (tmp file + rename)."""
    with atomic_open(path, "w") as f:
        f.write(text)


#: Periodic checkpoints: ``model_0000004.pth`` (detectron2's PeriodicCheckpointer naming).
_PERIODIC = re.compile(r"^model_(\d+)\.pth$")
FINAL = "model_final.pth"


class CheckpointResumeError(RuntimeError):
    """``--resume`` found checkpoints in the output directory, but none of them loads."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the previous one is intact)."""


def periodic_iteration(path):
    """The iteration in a periodic checkpoint's name (``model_0000004.pth`` -> 4), else None."""
    m = _PERIODIC.match(os.path.basename(path))
    return int(m.group(1)) if m else None


def list_checkpoints(save_dir):
    """Checkpoint basenames in ``save_dir``, newest first: ``model_final.pth``, then
    ``model_NNNNNNN.pth`` by decreasing iteration. Temporary and renamed-aside files are ignored."""
    if not os.path.isdir(save_dir):
        return []
    names = [n for n in os.listdir(save_dir) if _PERIODIC.match(n)]
    names.sort(key=periodic_iteration, reverse=True)
    if os.path.isfile(os.path.join(save_dir, FINAL)):
        names.insert(0, FINAL)
    return names


def _short(err):
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class AtomicDetectionCheckpointer(SafeDetectionCheckpointer):
    """A :class:`~kd_det.checkpoint.SafeDetectionCheckpointer` whose saves are atomic.

    Loading reads files as data only (``weights_only=True``, ``.pkl`` through the restricted
    unpickler); ``detectron2://`` URLs and the model-zoo formats work as in detectron2. ``save``
    and the ``last_checkpoint`` tag are written differently. Remote save directories (non-local
    ``PathManager`` handlers) fall back to the parent implementation, since rename is not atomic
    there.

    Resuming (:meth:`resume_or_load` with ``resume=True``) uses the tagged checkpoint if it loads,
    else the newest loadable ``model_*.pth`` (``model_final.pth`` first), and raises
    :class:`CheckpointResumeError` with the way to start over when checkpoints exist but none
    loads. Saving never replaces a file this checkpointer did not write: such a file (a checkpoint
    of an earlier run, or an unreadable one skipped on resume) is renamed aside first.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resumed_from = None  # path of the checkpoint --resume continued from
        self.resumed_iteration = None  # the iteration that checkpoint holds
        self._written = set()  # basenames saved by this object (this run)
        self._preloaded = None  # (path, dict) read while looking for a loadable checkpoint

    def save(self, name, **kwargs):
        """Write ``<save_dir>/<name>.pth`` atomically and tag it as the last checkpoint.

        A file of that name this run did not write is renamed aside (never deleted), once the new
        file is complete: e.g. the ``model_final.pth`` of a finished run that ``--resume`` with a
        larger ``SOLVER.MAX_ITER`` extends. Only a file that already holds this very state (the
        checkpoint this run resumed from, at the iteration being saved) is kept as is. A first
        SIGTERM/SIGINT during the write lets it finish (:mod:`.interrupt`).

        Raises:
            CheckpointSaveError: the write failed (a full disk, say); the message says that the
                previous checkpoint is intact.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        if not os.path.isdir(self.save_dir) and "://" in self.save_dir:
            return super().save(name, **kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        foreign = os.path.exists(save_file) and basename not in self._written
        if foreign and self._holds_this_state(save_file, kwargs.get("iteration")):
            logger.info(f"{save_file} is the checkpoint this run resumed from; kept as is.")
            self.tag_last_checkpoint(basename)
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        self.logger.info(f"Saving checkpoint to {save_file}")
        with finish_before_interrupt():  # the file and its tag
            try:
                with atomic_path(save_file) as tmp:
                    with open(tmp, "wb") as f:
                        torch.save(data, f)
                    if foreign:  # only now that the new file is complete
                        self._keep_aside(save_file, self._why_aside(save_file, kwargs))
            except (OSError, RuntimeError) as e:
                raise CheckpointSaveError(self._save_failed(save_file, e)) from e
            self._written.add(basename)
            self.tag_last_checkpoint(basename)

    def _holds_this_state(self, path, iteration):
        """Whether ``path`` is the checkpoint this run resumed from and holds ``iteration``."""
        return (
            self.resumed_from is not None
            and iteration is not None
            and self.resumed_iteration == iteration
            and os.path.samefile(path, self.resumed_from)
        )

    def _save_failed(self, save_file, err):
        tag = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with open(tag) as f:
                previous = os.path.join(self.save_dir, f.read().strip())
        except OSError:
            previous = ""
        intact = (
            f"the previous checkpoint {previous} is intact (last_checkpoint still names it)"
            if previous and os.path.isfile(previous)
            else "no earlier checkpoint of this run exists"
        )
        return (
            f"Could not write checkpoint '{save_file}' ({_short(err)}); the disk may be full. "
            f"Nothing was replaced: {intact}. Free space on the disk of '{self.save_dir}' (or "
            "move OUTPUT_DIR), then continue with --resume."
        )

    def _why_aside(self, path, kwargs):
        if self.resumed_from is not None and os.path.samefile(path, self.resumed_from):
            return (
                f"holds iteration {self.resumed_iteration}, where this run resumed and trained "
                f"on; the new file holds iteration {kwargs.get('iteration')}"
            )
        return "was not written by this run"

    @staticmethod
    def _keep_aside(path, why="was not written by this run"):
        """Rename a file this run did not write, instead of overwriting it; returns the new path."""
        aside = f"{path}.bak-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while os.path.exists(aside):
            aside = f"{path}.bak-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            n += 1
        os.replace(path, aside)
        logger.warning(f"{path} {why}; it is kept as {aside} instead of being overwritten.")
        return aside

    def find_resumable(self):
        """The checkpoint ``--resume`` continues from, or None when ``save_dir`` holds none.

        Tries the file named by ``last_checkpoint``, then every ``model_*.pth`` newest first, and
        returns the first that loads (it is read once: :meth:`load` reuses it).

        Raises:
            CheckpointResumeError: checkpoints (or a tag) exist, but none of them loads.
        """
        tag = os.path.join(self.save_dir, "last_checkpoint")
        problems, candidates = [], []
        if os.path.isfile(tag):
            try:
                with open(tag) as f:
                    named = f.read().strip()
            except (OSError, UnicodeDecodeError) as e:
                named = ""
                problems.append(f"last_checkpoint cannot be read ({_short(e)})")
            if named:
                candidates.append(os.path.join(self.save_dir, named))
            elif not problems:
                problems.append("last_checkpoint is empty")
        else:
            problems.append("there is no last_checkpoint tag")
        existing = list_checkpoints(self.save_dir)
        candidates += [os.path.join(self.save_dir, n) for n in existing]
        if not candidates and not os.path.isfile(tag):
            return None
        tried = set()
        for path in candidates:
            if path in tried:
                continue
            tried.add(path)
            if not os.path.isfile(path):
                problems.append(f"{os.path.basename(path)} (named by last_checkpoint) is missing")
                continue
            if not zipfile.is_zipfile(path):
                # torch.save writes a zip whose directory is at the end: a cut-off file has none.
                problems.append(
                    f"{os.path.basename(path)} cannot be loaded (truncated, or not written by "
                    "torch.save)"
                )
                continue
            try:
                data = self._torch_load(path)
            except Exception as e:  # a corrupt member, a pickle error ...
                problems.append(f"{os.path.basename(path)} cannot be loaded ({_short(e)})")
                continue
            if not isinstance(data, dict) or "model" not in data:
                problems.append(f"{os.path.basename(path)} holds no model state")
                continue
            self._preloaded = (path, data)
            self.resumed_iteration = data.get("iteration")
            if problems:
                logger.warning(
                    f"--resume: {'; '.join(problems)}. Resuming from {path}, the newest "
                    "checkpoint that loads."
                )
            return path
        raise CheckpointResumeError(
            f"--resume: no checkpoint in '{self.save_dir}' can be loaded: {'; '.join(problems)}. "
            "To start over, remove that directory or choose a new OUTPUT_DIR, or run without "
            "--resume (training then starts from MODEL.WEIGHTS at iteration 0, and existing "
            "checkpoints are renamed aside, never overwritten)."
        )

    def resume_or_load(self, path, *, resume=True):
        """detectron2's ``resume_or_load``, with the fallbacks of :meth:`find_resumable`."""
        if resume:
            found = self.find_resumable()
            if found is not None:
                self.resumed_from = found
                return self.load(found)
        return self.load(path, checkpointables=[])

    def has_checkpoint(self):
        # DefaultTrainer.resume_or_load asks this to decide whether the iteration was restored.
        return self.resumed_from is not None or super().has_checkpoint()

    def _torch_load(self, f):
        if self._preloaded is not None and self._preloaded[0] == f:
            data, self._preloaded = self._preloaded[1], None
            return data
        return super()._torch_load(f)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))


class PruningPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's ``PeriodicCheckpointer`` that prunes down to ``max_to_keep`` after each save.

    fvcore deletes at most one old file per save, which is enough only for files the hook wrote
    itself. :meth:`kd_det.engine.KDTrainer.resume_or_load` hands it the periodic checkpoints
    written before a resume (``recent_checkpoints``), possibly more than ``max_to_keep``; all of
    the surplus goes at the next save -- after the new file is complete, never before.
    """

    def step(self, iteration, **kwargs):
        super().step(iteration, **kwargs)
        if not self.max_to_keep:
            return
        while len(self.recent_checkpoints) > self.max_to_keep:
            old = self.recent_checkpoints.pop(0)
            if self.path_manager.exists(old) and not old.endswith(f"{self.file_prefix}_final.pth"):
                self.path_manager.rm(old)
