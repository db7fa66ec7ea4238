"""The run directory's life cycle: check it, lock it, clear what an old run left.

molf knows what it wrote from the directory's manifest (:mod:`molf.ownership`), never
from names. ``--overwrite`` removes exactly molf's entries and never the directory
itself; a directory holding anything else is refused, untouched. A directory whose
entries molf did not write sit where a run would write (``eval.json``, ``final/``,
``checkpoint-N/`` of a Hugging Face Trainer, ...) is refused too. A run holds an
exclusive lock on its directory (``.molf.lock``, with its pid) from the moment it
starts writing until it ends.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from molf.atomic import recover_dir
from molf.errors import MolfError
from molf.ownership import TEMP_PREFIX, PidLock, disown, is_internal, owned
from molf.train.checkpoint import PATTERN as CHECKPOINT_PATTERN
from molf.train.checkpoint import list_checkpoints

LOCK_FILE = ".molf.lock"
RUN_FILES = ("config.yaml", "train_log.jsonl", "routing.jsonl", "eval.json", "predictions.jsonl")
RUN_DIRS = ("final", "tensorboard", "wandb", "report")


def would_write(name: str) -> bool:
    """Whether a molf run may write an entry called ``name`` in its directory."""
    return name in RUN_FILES or name in RUN_DIRS or bool(CHECKPOINT_PATTERN.fullmatch(name))


def foreign_entries(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that molf did not write (sorted)."""
    if not run_dir.is_dir():
        return []
    ours = owned(run_dir)
    return sorted(
        p.name for p in run_dir.iterdir() if p.name not in ours and not is_internal(p.name)
    )


@dataclass(frozen=True)
class RunDir:
    """A run directory as molf reads it: the one place that says whether a run is
    finished (train, ``molf sweep`` and ``molf eval --run`` ask it)."""

    path: Path

    @property
    def config(self) -> dict[str, Any]:
        """The run's own settings (its config.yaml); empty when missing or unreadable."""
        try:
            config = yaml.safe_load((self.path / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            return {}
        return config if isinstance(config, dict) else {}

    @property
    def saves_model(self) -> bool:
        """Whether the run was told to save its model (``save_model``, on by default)."""
        return self.config.get("save_model", True) is not False

    @property
    def recorded(self) -> bool:
        """The run recorded its result: molf's eval.json has the metrics after training."""
        if "eval.json" not in owned(self.path):
            return False
        try:
            return "after" in json.loads((self.path / "eval.json").read_text())
        except (OSError, ValueError):
            return False

    @property
    def has_final(self) -> bool:
        """The trained model is saved (``final/``)."""
        return (self.path / "final").is_dir()

    @property
    def complete(self) -> bool:
        """Nothing is left to do: recorded, with its final model unless told not to save
        it (as a sweep's val cells are)."""
        return self.recorded and (self.has_final or not self.saves_model)

    @property
    def finished_without_model(self) -> bool:
        """Recorded with no final model (``save_model`` off, or its save failed)."""
        return self.recorded and not (self.path / "final").exists()

    @property
    def checkpoints(self) -> list[Path]:
        """Its ``checkpoint-N/`` directories, oldest first."""
        return list_checkpoints(self.path)

    def holds_finished_or_resumable_run(self) -> bool:
        """A run worth protecting: it has a final model, a checkpoint to resume from, or
        the results of a run that finished without saving its model (all molf's)."""
        return self.path.is_dir() and (
            "final" in owned(self.path) or bool(self.checkpoints) or self.finished_without_model
        )


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse what would mix or destroy runs; creates and deletes nothing.

    - ``--resume`` needs a checkpoint;
    - a finished or resumable run needs ``--resume`` or ``--overwrite``;
    - ``--overwrite`` refuses a directory holding files molf did not write;
    - entries molf did not write where a run writes are refused;
    - the directory must be creatable and writable (checked before any model loads).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise MolfError(f"--output-dir: {run_dir} is a file, not a directory")
    _check_writable(run_dir)
    if resume:
        if not list_checkpoints(run_dir):
            if RunDir(run_dir).finished_without_model:
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
    foreign = foreign_entries(run_dir)
    if overwrite and foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise MolfError(
            f"--overwrite: {run_dir} also holds files molf did not write ({shown}); "
            "--overwrite only replaces a run directory: move those files or pick "
            "another --output-dir"
        )
    if not overwrite and RunDir(run_dir).holds_finished_or_resumable_run():
        raise MolfError(
            f"--output-dir: {run_dir} already holds a run; pass --resume to "
            "continue it or --overwrite to replace it"
        )
    in_the_way = [n for n in foreign if would_write(n)]
    if in_the_way:
        raise MolfError(
            f"--output-dir: {run_dir / in_the_way[0]} was not written by molf and a run "
            "writes there; pick a new or empty --output-dir"
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
    for name in sorted(owned(run_dir)):
        entry = run_dir / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        disown(entry)


def clean_temporaries(run_dir: Path) -> None:
    """After a crash: restore ``final/`` if a replacement was cut short, drop temp entries."""
    recover_dir(run_dir / "final")
    for entry in run_dir.iterdir():
        if entry.name.startswith(TEMP_PREFIX):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()


class RunLock(PidLock):
    """An exclusive lock on ``run_dir/.molf.lock`` held for the run's lifetime (the
    kernel releases it when the process dies: a crash never leaves a stale lock)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(
            run_dir / LOCK_FILE,
            lambda pid: (
                f"--output-dir: {run_dir} is in use by another molf run "
                f"(pid {pid}); wait for it to end or pick another --output-dir"
            ),
        )


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
        if not resume and (overwrite or not RunDir(run_dir).holds_finished_or_resumable_run()):
            clear_run(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def holding_run(run_dir: Path | None) -> Iterator[None]:
    """While ``molf eval --run`` reads a run: the run's lock, so that no ``molf train``
    continues, replaces or deletes it meanwhile; refused (MolfError) while a training
    process (or another evaluation of it) holds it. A directory that is not a run (let
    :func:`run_settings` say so) or that this user cannot write is read unlocked."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        yield
        return
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except MolfError:
        holder = _lock_holder(lock.path)
        raise MolfError(
            f"--run: {run_dir} is in use by another molf process (pid {holder}): wait for "
            "it to end, then evaluate the run"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        lock = None  # a read-only run: nothing of ours can be writing it
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _lock_holder(path: Path) -> str:
    """The pid written in a lock file, or "unknown"."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
