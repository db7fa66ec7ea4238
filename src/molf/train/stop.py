"""How ``molf train`` stops before its end, and what it says: SIGTERM (between steps: a
checkpoint, then stop; anywhere else: at once, nothing half-written) and a full or
read-only disk. Every message says how to go on with the run (:func:`continue_hint`)."""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from molf.atomic import Terminated, interrupt
from molf.errors import MolfError
from molf.ownership import TEMP_PREFIX
from molf.train.checkpoint import list_checkpoints


class DiskFull(MolfError):
    """The disk filled up (or the quota ran out) while the run wrote: exit code 1, since
    nothing about the input is wrong; the message says how to go on."""

    exit_code = 1


def disk_failure(error: OSError, run_dir: Path) -> MolfError:
    """One line for a full (:class:`DiskFull`) or read-only disk met while writing the
    run in ``run_dir``: the path, and how to go on."""
    where = Path(error.filename) if error.filename else run_dir
    if where.name.startswith(TEMP_PREFIX):  # molf's temporary: name what it was for
        where = where.parent
    hint = continue_hint(run_dir)
    if error.errno == errno.EROFS:
        return MolfError(
            f"--output-dir: cannot write {where}: read-only file system; make it writable "
            f"and {hint}, or give a writable --output-dir"
        )
    return DiskFull(
        f"{error.strerror} while writing {where}; nothing half-written was kept: free "
        f"some space, then {hint}"
    )


def continue_hint(run_dir: Path) -> str:
    """How to go on with the run in ``run_dir`` after it stopped: ``--resume`` from its
    newest checkpoint, or (none written) the same command again."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        return f"continue with --resume (from {checkpoints[-1].name})"
    return "start the run again (the same command: no checkpoint was written)"


class SigtermStop:
    """SIGTERM during ``molf train`` (what schedulers send before killing a job).

    Between training steps (:attr:`between_steps`) it only sets a flag: the loop
    finishes its step, writes a checkpoint and stops. Anywhere else it raises
    :class:`Terminated` at once: molf's atomic writers then leave the old file or
    directory and remove their temporaries (a directory being renamed into place is
    finished first), and the message names the :attr:`stage` and says whether
    ``--resume`` continues the run (:func:`continue_hint`, or :attr:`hint` when set)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stage = "the setup"
        self.hint: str | None = None
        self.between_steps = False
        self.received = False

    def requested(self) -> bool:
        return self.received

    def error(self) -> Terminated:
        hint = self.hint or continue_hint(self.run_dir)
        return Terminated(f"interrupted (SIGTERM) during {self.stage}; {hint}")

    def raise_if_requested(self) -> None:
        if self.received:
            raise self.error()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:  # a repeated signal: the first one is being acted on
            return
        self.received = True
        if not self.between_steps:
            interrupt(self.error)

    @contextmanager
    def installed(self) -> Iterator[SigtermStop]:
        """Handle SIGTERM this way inside the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
