"""The sweep's processes: one sweep per output directory, and no cell outliving it.

:class:`SweepLock` is an exclusive ``flock`` on ``OUTPUT_DIR/.molf.sweep.lock`` (the
holder's pid inside), held while a sweep reads and rewrites its summary and runs
cells; the kernel releases it when the process dies, so a killed sweep never leaves a
stale lock. Its name starts with ``.molf.``, so :mod:`molf.ownership` treats it as
molf's bookkeeping.

:func:`run_child` runs a cell's ``molf train``: on Linux the child asks the kernel for
SIGTERM when the sweep dies (``prctl(PR_SET_PDEATHSIG)``; this holds even for a
SIGKILL of the sweep), and a sweep that is interrupted (Ctrl-C, SIGTERM) passes SIGTERM
on to the child and waits for it, so the child writes its checkpoint and the run
directory is free again when the sweep has exited.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

from molf.errors import MolfError
from molf.ownership import PidLock

LOCK_FILE = ".molf.sweep.lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_GRACE_S = 60.0  # how long an interrupted cell may take to checkpoint and exit


class SweepLock(PidLock):
    """An exclusive lock on ``output_dir/.molf.sweep.lock`` (use as a context)."""

    def __init__(self, output_dir: Path) -> None:
        super().__init__(
            Path(output_dir) / LOCK_FILE,
            lambda pid: (
                f"output_dir: {output_dir} is in use by another molf sweep "
                f"(pid {pid}); wait for it to end, or stop it and rerun"
            ),
        )


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when ``parent`` dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stop_child(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM ``proc`` (molf train checkpoints and exits), wait for it, SIGKILL it if it
    has not exited after ``grace_s``. Further Ctrl-C's while waiting are not lost: the
    child is still stopped and reaped before they propagate."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_child(cmd: list[str], log: IO[str]) -> int:
    """Run ``cmd`` with its output to ``log``; its exit code. If the sweep is interrupted
    while it runs, the child is stopped (:func:`stop_child`) before the interrupt goes on."""
    try:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent(os.getpid())
        )
    except (FileNotFoundError, PermissionError) as e:
        raise MolfError(
            f"launcher: cannot run {cmd[0]!r} ({e.strerror}); set the sweep file's launcher: "
            "to an installed command (e.g. torchrun --nproc-per-node 2 -m molf), or null "
            "for this Python's -m molf"
        ) from None
    try:
        return proc.wait()
    except BaseException:  # KeyboardInterrupt: Ctrl-C, or SIGTERM (molf.sweep)
        stop_child(proc)
        raise
