"""What a cell reads: content fingerprints of its data, its model and its chat template.

The settings hash (:func:`molf.sweep.results.fingerprint`) leaves out ``data`` and
``model``, whose values are machine-specific paths (``${MOLF_DATA_DIR}/...``). The
sweep identifies them by content instead, the same on every machine and checkout:

- a file: the sha256 of its bytes;
- a directory: its files' (relative name, size, sha256), names starting with '.'
  (``.git``, molf's manifest and locks, a hub download's ``.cache``) left out;
- a file over :data:`LARGE` bytes (model weights): its size and the sha256 of its
  first and last MiB, so a sweep never reads gigabytes to start;
- a value the tasks read in their own ways (Spider's ``DIR#MODE``, the demo's
  ``builtin``, a hub dataset id): the data each task finds in it, a path by its
  fingerprint and split mode (a setting: it counts), a name by itself;
- no data: the task's hub dataset;
- a packaged short name (``smollm2-135m``): the name and its package's version (or
  the hub id it falls back to when the package is missing); a hub id: the id; a local
  model directory: its fingerprint, or only its GGUF file's with ``gguf_file``;
- a ``--chat-template`` file: its bytes (``auto`` and ``none`` are plain settings).

File hashes are cached per (path, size, mtime) within a process, so the many cells
that share one dataset hash it once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molf.errors import MolfError

if TYPE_CHECKING:
    from molf.tasks import Task

LARGE = 64 * 1024 * 1024  # bytes: above this only the size and both ends are hashed
EDGE = 1024 * 1024  # bytes hashed at each end of a large file
_CHUNK = 1024 * 1024
_file_cache: dict[tuple[str, int, int, int], str] = {}


def _short(parts: Any) -> str:
    """A 12-hex-digit hash of a JSON-able description (the width of settings_hash)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _hash_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= LARGE:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(f"large:{size}:".encode())
        digest.update(f.read(EDGE))
        f.seek(size - EDGE)
        digest.update(f.read(EDGE))
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes (of its size and first and last MiB over :data:`LARGE`),
    cached within the process by path, size and modification time."""
    st = os.stat(path)
    key = (str(Path(path).absolute()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _file_cache:
        _file_cache[key] = _hash_file(Path(path), st.st_size)
    return _file_cache[key]


def tree_entries(root: Path) -> list[tuple[str, int, str]]:
    """(relative posix name, size, sha256) of every file under ``root``, sorted; entries
    whose name starts with '.' (and everything under them) are left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            out.append((rel, path.stat().st_size, file_hash(path)))
    return sorted(out)


def path_identity(path: Path) -> list[Any]:
    """A file's or a directory's content, as a JSON-able description."""
    if path.is_file():
        return ["file", file_hash(path)]
    if path.is_dir():
        return ["dir", tree_entries(path)]
    return ["missing"]


def data_identity(data: str | None) -> list[Any]:
    """What ``--data`` stands for, independent of where it lies on this machine: the data
    each task finds in it (:meth:`molf.tasks.Task.data_path`), once when those readings
    agree (as on a plain path), else each distinct reading."""
    from molf.tasks import TASK_NAMES, get_task

    if data is None:
        return ["hub"]
    readings: list[list[Any]] = []
    for name in TASK_NAMES:
        reading = _found(get_task(name), str(data))
        if reading is not None and reading not in readings:
            readings.append(reading)
    if not readings:
        return ["missing", None]  # load_sweep has refused it already
    return readings[0] if len(readings) == 1 else readings


def _found(task: Task, data: str) -> list[Any] | None:
    """The data ``task`` finds in ``data``: a path's content and split mode, or the name;
    None when it names no existing file or directory, or a value the task cannot read."""
    try:
        local = task.data_path(data)
    except MolfError:
        return None
    if local.path is None:
        return [data]  # a name: the built-in edits, a hub dataset id
    if not local.path.exists():
        return None
    return [*path_identity(local.path), local.mode]


@functools.cache
def _package_version(package: str) -> str | None:
    """The installed version of the distribution providing import name ``package`` (None
    when it cannot be imported: molf then loads the hub model). Cached: the lookup of a
    distribution by import name reads every installed package's metadata."""
    if importlib.util.find_spec(package) is None:  # does not import the package
        return None
    try:
        return metadata.version(package)  # the import name is usually the dist name
    except metadata.PackageNotFoundError:
        pass
    for name in metadata.packages_distributions().get(package, []):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def model_identity(model: str | None, gguf_file: str | None) -> list[Any]:
    """What ``--model`` (and ``--gguf-file``) stand for; never downloads or assembles."""
    from molf.train.modeling import PACKAGED_MODELS, resolve_model

    if model is None and gguf_file is None:
        model = "smollm2-135m"  # the default model is this short name's (modeling.py)
    if model in PACKAGED_MODELS:
        spec = PACKAGED_MODELS[model]
        version = _package_version(spec.package)
        if version is None:
            return ["hub", spec.hub_id]  # what molf loads without the package
        return ["packaged", model, spec.package, version]
    try:
        name, gguf = resolve_model(model, gguf_file)
    except MolfError:
        return ["missing"]  # the cell fails and records that; nothing to compare
    if not Path(name).is_dir():
        return ["hub", name, gguf]
    if gguf:
        return ["gguf", gguf, file_hash(Path(name) / gguf)]
    return ["dir", tree_entries(Path(name))]


def data_hash(data: str | None) -> str:
    """The summary's ``data_hash``: a short content hash of a cell's data."""
    return _short(data_identity(data))


def model_hash(model: str | None, gguf_file: str | None) -> str:
    """The summary's ``model_hash``: a short content hash of a cell's model."""
    return _short(model_identity(model, gguf_file))


def template_hash(chat_template: str) -> str | None:
    """The summary's ``template_hash``: a short content hash of a ``--chat-template``
    file; None for ``auto`` and ``none`` (the settings hash holds those)."""
    from molf.train.setting_values import CHAT_TEMPLATES

    if chat_template in CHAT_TEMPLATES:
        return None
    return _short(path_identity(Path(chat_template)))
