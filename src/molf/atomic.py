"""Crash-safe writes: a file or directory appears complete under its name, or not at all.

Everything is written under a temporary name beside its destination
(``.molf-tmp-<name>-*``), flushed to disk (``fsync`` of every file and of the
directory), then renamed into place. A directory that already exists is replaced
keep-old-until-new-is-in-place: the old one is renamed aside
(``.molf-tmp-<name>-old-*``), the new one renamed in, and only then the old one
deleted; :func:`recover_dir` puts the old one back if a crash hit between the renames.

Each destination is claimed first (:func:`molf.ownership.claim`): molf replaces only
what it wrote itself, and refuses to write over anything else.

Permissions follow the umask like any other tool's output (``mkstemp``/``mkdtemp``
would otherwise leave 0600 files and 0700 directories).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from molf.ownership import TEMP_PREFIX, claim

OLD_TAG = "-old-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and every directory (``root`` included) to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _chmod_tree(root: Path) -> None:
    """Give a fresh temporary tree the permissions the umask asks for."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename."""
    path = Path(path)
    claim(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """``with atomic_file(p) as tmp:`` write the file ``tmp`` (e.g. a figure); on success it
    becomes ``p`` (flushed, umask permissions); on any error it is removed."""
    path = Path(path)
    claim(path)
    fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``; an existing ``final`` is kept
    until the new one is in place, then deleted."""
    claim(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}{OLD_TAG}", dir=final.parent))
        os.replace(final, old)  # onto the fresh empty directory: allowed by rename(2)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """``with atomic_directory(d) as tmp:`` write into ``tmp``; on success it becomes ``d``
    (flushed, umask permissions, any old ``d`` replaced); on any error it is removed."""
    final = Path(final)
    claim(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        _chmod_tree(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(final: Path) -> None:
    """After a crash: bring back ``final`` from its renamed-aside old copy if the new one
    never arrived, and delete temporary leftovers of ``final`` (``.molf-tmp-<name>-*``)."""
    final = Path(final)
    leftovers = sorted(final.parent.glob(f"{TEMP_PREFIX}{final.name}-*"))
    olds = [
        p
        for p in leftovers
        if p.name.startswith(f"{TEMP_PREFIX}{final.name}{OLD_TAG}") and p.is_dir()
    ]
    if not final.exists() and olds:
        os.replace(olds[-1], final)
    for p in leftovers:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
