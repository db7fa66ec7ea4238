"""The run directory's life cycle: check it, lock it, clear what an old run left.

A run directory holds only what a molf run writes (:data:`RUN_FILES`, :data:`RUN_DIRS`,
``checkpoint-N/`` and molf's temporary ``.<name>-*`` entries). ``--overwrite`` removes
exactly those entries and never the directory itself; a directory holding anything
else is refused, untouched. A run holds an exclusive lock on its directory
(``.molf.lock``, with its pid) from the moment it starts writing until it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import IO

from molf.atomic import recover_dir
from molf.errors import MolfError
from molf.train.checkpoint import PATTERN as CHECKPOINT_PATTERN
from molf.train.checkpoint import list_checkpoints

LOCK_FILE = ".molf.lock"
RUN_FILES = ("config.yaml", "train_log.jsonl", "routing.jsonl", "eval.json", "predictions.jsonl")
RUN_DIRS = ("final", "tensorboard", "wandb", "report")
_TEMP = re.compile(
    r"^\.(?:checkpoint-\d+|final|" + "|".join(re.escape(n) for n in RUN_FILES) + r")[-.]"
)


def is_molf_entry(name: str) -> bool:
    """Whether a run directory entry called ``name`` is something a molf run writes."""
    return (
        name in RUN_FILES
        or name in RUN_DIRS
        or name == LOCK_FILE
        or bool(CHECKPOINT_PATTERN.fullmatch(name))
        or bool(_TEMP.match(name))
    )


def foreign_entries(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that molf did not write (sorted)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if not is_molf_entry(p.name))


def holds_finished_or_resumable_run(run_dir: Path) -> bool:
    """A run worth protecting: it has a final model, a checkpoint to resume from, or the
    results of a run that finished without saving its model."""
    return run_dir.is_dir() and (
        (run_dir / "final").exists()
        or bool(list_checkpoints(run_dir))
        or finished_without_model(run_dir)
    )


def is_recorded(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` recorded its result: eval.json has the metrics
    after training."""
    try:
        return "after" in json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return False


def finished_without_model(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that recorded its result without a final model
    (``save_model`` off)."""
    return is_recorded(run_dir) and not (run_dir / "final").exists()


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse what would mix or destroy runs; creates and deletes nothing.

    - ``--resume`` needs a checkpoint;
    - a finished or resumable run needs ``--resume`` or ``--overwrite``;
    - ``--overwrite`` refuses a directory holding files molf did not write;
    - the directory must be creatable and writable (checked before any model loads).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise MolfError(f"--output-dir: {run_dir} is a file, not a directory")
    _check_writable(run_dir)
    if resume:
        if not list_checkpoints(run_dir):
            if finished_without_model(run_dir):
                raise MolfError(
                    f"--resume: {run_dir} finished without saving its model (save_model "
                    "off) and keeps no checkpoint, so there is nothing to resume; "
                    "--overwrite trains it again"
                )
            raise MolfError(
                f"--resume: no checkpoint in {run_dir} (a run writes one every --save-steps "
                "steps and one after its last step)"
            )
        return
    if overwrite:
        foreign = foreign_entries(run_dir)
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise MolfError(
                f"--overwrite: {run_dir} also holds files molf did not write ({shown}); "
                "--overwrite only replaces a run directory: move those files or pick "
                "another --output-dir"
            )
        return
    if holds_finished_or_resumable_run(run_dir):
        raise MolfError(
            f"--output-dir: {run_dir} already holds a run; pass --resume to "
            "continue it or --overwrite to replace it"
        )
    written = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    named_like_ours = sorted(n for n in written if n in RUN_FILES or n in RUN_DIRS)
    if named_like_ours and foreign_entries(run_dir):
        raise MolfError(
            f"--output-dir: {run_dir} holds files molf did not write next to "
            f"{', '.join(named_like_ours)}, which a run would replace; pick a new or empty "
            "--output-dir"
        )


def _check_writable(run_dir: Path) -> None:
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MolfError(f"--output-dir: {existing} is a file, so {run_dir} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MolfError(f"--output-dir: {existing} is not writable")


def clear_run(run_dir: Path) -> None:
    """Delete the entries a previous run wrote (never anything else, never the dir)."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK_FILE or not is_molf_entry(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def clean_temporaries(run_dir: Path) -> None:
    """After a crash: restore ``final/`` if a replacement was cut short, drop temp entries."""
    recover_dir(run_dir / "final")
    for entry in run_dir.iterdir():
        if _TEMP.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.molf.lock`` held for the run's lifetime.

    The kernel releases it when the process dies, so a crashed run never leaves a
    stale lock behind."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise MolfError(
                f"--output-dir: {self.path.parent} is in use by another molf run "
                f"(pid {holder}); wait for it to end or pick another --output-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def start_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Create and lock ``run_dir``, re-check it under the lock, then clear what must go:
    crash leftovers always; the old run on ``--overwrite``; an unfinished run that left
    nothing to resume (no checkpoint, no final model) always, since it cannot be continued.

    Called once every setting, the data and the model have been checked, so a bad input
    never costs the previous run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # another run may have ended
        clean_temporaries(run_dir)
        if not resume and (overwrite or not holds_finished_or_resumable_run(run_dir)):
            clear_run(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock
