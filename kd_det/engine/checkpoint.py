"""Crash-safe checkpointing.

fvcore's ``Checkpointer.save`` streams ``torch.save`` straight into the final file and then rewrites
the ``last_checkpoint`` tag in place. A process killed mid-write (OOM killer, pre-emption, Ctrl-C)
leaves a truncated ``model_XXXX.pth`` or ``model_final.pth`` -- or a half-written tag -- and
``--resume`` then fails or, worse, picks up a file that cannot be loaded. Here both the checkpoint
and the tag are written to a temporary file in the same directory, flushed to disk and renamed over
the target with ``os.replace``, which is atomic on POSIX and Windows: a reader sees either the old
file or the complete new one, never a partial one.
"""

import contextlib
import logging
import os
import tempfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)


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
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
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


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose saves are atomic.

    Loading, ``detectron2://`` URLs, model-zoo and pickle formats are unchanged; only ``save`` and
    the ``last_checkpoint`` tag are written differently. Remote save directories (non-local
    ``PathManager`` handlers) fall back to the parent implementation, since rename is not atomic
    there.
    """

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if not os.path.isdir(self.save_dir) and "://" in self.save_dir:
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))
