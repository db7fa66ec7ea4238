"""What molf wrote, so that it replaces or deletes only that.

Every directory molf writes into keeps a manifest, ``.molf-owned.json``: the names of
the entries molf created there. Before molf writes, replaces or appends to a path it
*claims* it: a path that does not exist yet is recorded as molf's; one that exists must
already be recorded, or molf refuses (:class:`~molf.errors.MolfError`, one line naming
the path and the way out) and leaves it untouched. Deleting follows the same rule
(:func:`remove_owned`). Whether something is molf's is never guessed from its name:
a user's ``eval.json``, ``index.html`` or a Hugging Face Trainer's ``checkpoint-500/``
stays theirs.

The manifest is updated under an exclusive ``flock`` of its directory (several runs
may append to one ``results.csv``) and written through a temporary file and a rename.
Temporary names start with ``.molf-tmp-`` (:data:`TEMP_PREFIX`), so no user dot-file
is ever taken for one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from molf.errors import MolfError

MANIFEST = ".molf-owned.json"
TEMP_PREFIX = ".molf-tmp-"
_claimed: set[str] = set()  # absolute paths this process has claimed (saves re-reading)


@contextmanager
def locked_dir(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory`` itself (no lock file is created)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class PidLock:
    """An exclusive, non-blocking ``flock`` on the file ``path``, which holds the
    holder's pid. The kernel releases it when the process dies, so a crash never leaves
    a stale lock. ``busy`` makes the one-line message for a lock held elsewhere from
    the holder's pid. Use :meth:`acquire` / :meth:`release`, or as a context."""

    def __init__(self, path: Path, busy: Callable[[str], str]) -> None:
        self.path, self._busy = Path(path), busy
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # not inherited by child processes (PEP 446)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise MolfError(self._busy(holder)) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the flock
            self._file = None

    def __enter__(self) -> PidLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def owned(directory: Path) -> set[str]:
    """The names molf recorded as its own in ``directory`` (empty without a manifest; a
    manifest that cannot be read owns nothing, so nothing is ever replaced by mistake)."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    entries = data.get("entries") if isinstance(data, dict) else None
    return {e for e in entries if isinstance(e, str)} if isinstance(entries, list) else set()


def is_internal(name: str) -> bool:
    """molf's bookkeeping entries: the manifest, lock files and temporaries."""
    return name == MANIFEST or name.startswith((TEMP_PREFIX, ".molf."))


def owns(path: Path) -> bool:
    """Whether molf wrote ``path`` (recorded in its directory's manifest)."""
    path = Path(path)
    return path.name in owned(path.parent)


def foreign(paths: Iterable[Path]) -> list[Path]:
    """The paths among ``paths`` that exist and that molf did not write."""
    return [p for p in paths if (p.exists() or p.is_symlink()) and not owns(p)]


def refuse_foreign(paths: Iterable[Path], way_out: str) -> None:
    """A MolfError naming the first existing path molf did not write, and ``way_out``."""
    found = foreign(paths)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise MolfError(f"{found[0]} exists and was not written by molf{more}; {way_out}")


def _write_manifest(directory: Path, names: set[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{MANIFEST}-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"molf": 1, "entries": sorted(names)}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, directory / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def claim(path: Path, way_out: str = "move it away or choose another output location") -> None:
    """Record ``path`` as molf's before molf writes it; refuse if something that molf did
    not write is already there. Creates the parent directory if needed. Paths inside
    molf's temporaries (``.molf-tmp-*``) are molf's by construction and not recorded."""
    path = Path(path).absolute()
    if str(path) in _claimed or any(is_internal(part) for part in path.parts):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_dir(path.parent):
        names = owned(path.parent)
        if path.name not in names:
            refuse_foreign([path], way_out)
            _write_manifest(path.parent, names | {path.name})
    _claimed.add(str(path))


def disown(path: Path) -> None:
    """Forget ``path`` (after molf deleted it)."""
    path = Path(path).absolute()
    _claimed.discard(str(path))
    if not path.parent.is_dir():
        return
    with locked_dir(path.parent):
        names = owned(path.parent)
        if path.name in names:
            _write_manifest(path.parent, names - {path.name})


def remove_owned(path: Path) -> bool:
    """Delete ``path`` if molf wrote it (a file or a whole directory); True if deleted.
    Something molf did not write is left alone."""
    path = Path(path)
    if not owns(path):
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    disown(path)
    return True
