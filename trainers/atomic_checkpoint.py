"""Checkpoints written atomically, so that a job killed during a save can still resume with ``--c``."""
from __future__ import annotations

import contextlib
import os


class AtomicCheckpoints:
    """Mixin for an nnU-Net trainer: ``save_checkpoint`` writes into ``filename + '.partial'`` beside the target,
    flushes it to disk and renames it over ``filename``.

    nnU-Net writes in place, so a job killed during a save (time limit, preemption) leaves a truncated
    ``checkpoint_latest.pth`` and ``--c`` fails; here the previous checkpoint stays whole. Rank 0 alone writes, as in
    nnU-Net.
    """

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # nnU-Net's own no-op / "checkpointing is disabled" message
            return
        partial = filename + ".partial"
        try:
            super().save_checkpoint(partial)
            with open(partial, "r+b") as f:
                os.fsync(f.fileno())
            os.replace(partial, filename)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; not possible on Windows)
            fd = os.open(os.path.dirname(os.path.abspath(filename)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
