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

A full or read-only disk is raised as an ``OSError`` (``ENOSPC``, ``EDQUOT`` or
``EROFS``) naming the destination, whichever writer hit it: ``torch.save`` and
safetensors report it as a ``RuntimeError`` of their own (:func:`disk_error`).

An interruption raised through :func:`interrupt` (molf's SIGTERM handler) while a
directory is being renamed into place waits until the renames are done, so that a
stopped run leaves the old directory or the new one, never neither.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from molf.ownership import TEMP_PREFIX, claim

OLD_TAG = "-old-"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_ERRNOS = (*DISK_FULL, errno.EROFS)
LOW_SPACE = 2**20  # bytes left below which a failed write is taken for a full disk

_renaming = 0  # replace_dir calls in progress
_deferred: list[Callable[[], BaseException]] = []  # an interruption that waits for them


class Terminated(BaseException):
    """A stop on request (SIGTERM) raised outside the training steps (loading,
    evaluating, saving, uploading) through :func:`interrupt`. A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it; the CLI
    exits 130 with its message, which says how to go on."""


def interrupt(error: Callable[[], BaseException]) -> None:
    """Raise ``error()`` (from a signal handler) now, or, while a directory is being
    renamed into place (:func:`replace_dir`), as soon as that is done (``error`` is
    called then, so that its message sees the new directory)."""
    if _renaming:
        _deferred[:] = [error]
        return
    raise error()


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold back :func:`interrupt` until the block is done."""
    global _renaming
    _renaming += 1
    try:
        yield
    except BaseException:
        _deferred.clear()  # the block's own error ends the work anyway
        raise
    finally:
        _renaming -= 1
    if not _renaming and _deferred:
        raise _deferred.pop()()


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_error(exc: BaseException, path: Path) -> OSError | None:
    """``exc``, raised while writing ``path``, as a new OSError ``ENOSPC``/``EDQUOT``/
    ``EROFS`` naming ``path`` (not the temporary written meanwhile) when a full or
    read-only disk caused it; else None. Python's own writes say so in ``errno``;
    ``torch.save`` and safetensors raise a RuntimeError of their own, so for those the
    file system is asked (call this before the temporary files are removed: they are
    what filled the disk)."""
    if isinstance(exc, OSError):
        if exc.errno not in DISK_ERRNOS:
            return None
        return OSError(exc.errno, exc.strerror, str(path))
    if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: not the disk
        return None
    try:
        fs = os.statvfs(_existing(path))
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        code = errno.EROFS
    elif fs.f_bavail * fs.f_frsize < LOW_SPACE:
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, os.strerror(code), str(path))


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
    except BaseException as e:
        problem = disk_error(e, path)
        Path(tmp).unlink(missing_ok=True)
        if problem is not None:
            raise problem from e
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
    except BaseException as e:
        problem = disk_error(e, path)
        tmp.unlink(missing_ok=True)
        if problem is not None:
            raise problem from e
        raise
    _fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``; an existing ``final`` is kept
    until the new one is in place, then deleted."""
    claim(final)
    with _uninterrupted():
        old = None
        if final.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}{OLD_TAG}", dir=final.parent)
            )
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
    except BaseException as e:
        problem = disk_error(e, final)
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is not None:
            raise problem from e
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
