"""The routed step as a fused CPU kernel (``implementation="cpu_kernel"``): building it.

torch's foreach ops each make a full pass over memory (and allocate a full-size
temporary) on the CPU, so an eager MoLF step moves about four times the bytes of
``torch.optim.AdamW(fused=True)``. Two C loops move little more than AdamW does:

* ``molf_nonfinite``: read every gradient once: is any entry NaN or infinite? (A
  skipped step must leave every moment untouched, so this has to come first.)
* ``molf_step``: module by module, read ``g, m, v`` and write ``m, v`` with a score
  partial sum per chunk; route that module's experts (Top-K on its scores, on the
  host side of the loop, with no Python involved); then update the winners' weights
  while their moments are still in the cache. Losers' weights are not read at all.

Per parameter that is 4 + 20 + 16 bytes for a winner and 4 + 20 for a loser, against
AdamW's 28. Nothing in Python looks at a tensor's value. The C source
(``cpu_kernel.c``, shipped with the package) is compiled with
the system C compiler into a cache directory (``$MOLF_CACHE_DIR``, else
``~/.cache/molf``) the first time it is needed (about a second). Without a compiler,
or with ``MOLF_CPU_KERNEL=0``, :func:`load` returns ``None`` (:data:`unavailable_reason`
says why) and the optimizer uses its foreach path; with ``MOLF_REQUIRE_CPU_KERNEL=1``
(CI) that raises :class:`CpuKernelUnavailable` instead. A compiler that is there but
fails to build the kernel is a bug, not a reason to fall back: :func:`load` raises
:class:`CpuKernelBuildError` with the compiler's output. Partial sums are taken over
fixed-size chunks and added in order, so results do not depend on the number of
threads; scores and routing are computed in float32 exactly as the foreach path's
tensor ops compute them.

This module builds, caches and loads the library; :mod:`molf.optim.cpu_kernel_calls`
holds :class:`Kernel`, the ctypes calls into it and the checks that guard them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from molf.optim.cpu_kernel_calls import Kernel

logger = logging.getLogger("molf")

# The C source ships beside this module (package data); its hash names the cached build.
_SOURCE = (Path(__file__).with_name("cpu_kernel.c")).read_text(encoding="utf-8")

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]


def _cache_dir() -> Path:
    d = os.environ.get("MOLF_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "molf"


def _cpu_signature() -> str:
    """The CPU's feature flags: the library is built with -march=native."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


class CpuKernelBuildError(RuntimeError):
    """A C compiler was found but did not build (or the result did not load) the CPU
    kernel; the message holds the compiler's output. Set ``MOLF_CPU_KERNEL=0`` (or pass
    ``implementation="foreach"``) to train without it."""


class CpuKernelUnavailable(RuntimeError):
    """``MOLF_REQUIRE_CPU_KERNEL=1`` and the kernel cannot be used (no compiler, or
    ``MOLF_CPU_KERNEL=0``)."""


class _VariantFailed(Exception):
    """One build of the library (with or without OpenMP) failed; the message says how."""


def _tail(text: str, limit: int = 4000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _compile(cc: list[str], out: Path, openmp: bool) -> None:
    """Build the library at ``out``. Raises ``OSError`` when ``out``'s directory cannot
    be written, and :class:`_VariantFailed` with the compiler's output when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "molf_adamw.c"
        src.write_text(_SOURCE)
        so = Path(tmp) / out.name
        omp = ["-fopenmp"] if openmp else []
        cmd = [*cc, *_FLAGS, *omp, str(src), "-o", str(so), "-lm"]
        shown = shlex.join(cmd)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise _VariantFailed(f"`{shown}` ran for over 300 s") from None
        except OSError as exc:  # found on PATH but could not be started
            raise _VariantFailed(f"`{shown}` could not run: {exc}") from None
        if res.returncode != 0:
            output = _tail(res.stderr + "\n" + res.stdout) or "(no output)"
            raise _VariantFailed(f"`{shown}` exited with status {res.returncode}:\n{output}")
        if not so.is_file():
            raise _VariantFailed(f"`{shown}` succeeded but wrote no {so.name}")
        os.replace(so, out)  # atomic: concurrent processes never see half a file


_kernel: Kernel | None = None
_tried = False
_error: str | None = None  # why the build failed: load() raises it again
unavailable_reason: str | None = None  # why load() returned None


def _find_compiler() -> list[str] | None:
    """``$CC`` (it may carry arguments, e.g. ``ccache gcc``), else cc or gcc on PATH;
    ``None`` when there is none. A ``$CC`` that names no program counts as none."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        argv = shlex.split(cc)
        exe = shutil.which(argv[0])
        return None if exe is None else [exe, *argv[1:]]
    exe = shutil.which("cc") or shutil.which("gcc")
    return None if exe is None else [exe]


def _load_variant(cc: list[str], path: Path, openmp: bool) -> Kernel:
    if not path.exists():
        _compile(cc, path, openmp)
    try:
        return Kernel(ctypes.CDLL(str(path)), openmp)
    except (OSError, AttributeError) as exc:  # cannot be loaded, or lacks a symbol
        raise _VariantFailed(f"{path} was built but does not load: {exc}") from None


def _build() -> Kernel | None:
    """The kernel; ``None`` (with :data:`unavailable_reason` set) where it cannot be
    built. Raises :class:`CpuKernelBuildError` when the compiler fails."""
    global unavailable_reason
    if os.environ.get("MOLF_CPU_KERNEL", "1") == "0":
        unavailable_reason = "MOLF_CPU_KERNEL=0"
        return None
    cc = _find_compiler()
    if cc is None:
        given = os.environ.get("CC", "").strip()
        unavailable_reason = (
            f"no C compiler: $CC={given!r} is not a program"
            if given
            else "no C compiler: neither cc nor gcc is on PATH (or set $CC)"
        )
        return None
    key = hashlib.sha256(
        "\0".join([_SOURCE, *cc, " ".join(_FLAGS), platform.machine(), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    fallback = Path(tempfile.gettempdir()) / f"molf-{getattr(os, 'getuid', lambda: 0)()}"
    unwritable = []
    for directory in (_cache_dir(), fallback):
        failures = []
        for openmp in (True, False):  # OpenMP where the compiler has it, else one thread
            path = directory / f"molf_adamw_{key}{'_omp' if openmp else ''}.so"
            try:
                return _load_variant(cc, path, openmp)
            except _VariantFailed as exc:
                logger.debug("molf CPU kernel: %s", exc)
                failures.append(f"{'with' if openmp else 'without'} OpenMP: {exc}")
            except OSError as exc:  # this directory cannot be written: try the next one
                unwritable.append(f"{directory}: {exc}")
                break
        if failures and len(failures) == 2:
            raise CpuKernelBuildError(
                f"molf CPU kernel: the C compiler {shlex.join(cc)} did not build it (set "
                "MOLF_CPU_KERNEL=0 to use the foreach path instead)\n" + "\n".join(failures)
            )
    unavailable_reason = "no writable cache directory for the C kernel: " + "; ".join(unwritable)
    return None


def load() -> Kernel | None:
    """The compiled kernel, or ``None`` where it cannot be built (then use foreach;
    :data:`unavailable_reason` says why). Raises :class:`CpuKernelBuildError` when a
    compiler is there but fails (every call, without trying again), and
    :class:`CpuKernelUnavailable` instead of returning ``None`` when the environment
    sets ``MOLF_REQUIRE_CPU_KERNEL=1``."""
    global _kernel, _tried, _error
    if not _tried:
        _tried = True
        try:
            _kernel = _build()
        except CpuKernelBuildError as exc:
            _error = str(exc)
        if _kernel is None and _error is None:
            logger.info("molf: %s; MoLFAdamW uses its foreach path on the CPU", unavailable_reason)
    if _error is not None:
        raise CpuKernelBuildError(_error)
    if _kernel is None:
        if os.environ.get("MOLF_REQUIRE_CPU_KERNEL", "0") == "1":
            raise CpuKernelUnavailable(
                f"MOLF_REQUIRE_CPU_KERNEL=1 but the CPU kernel is unavailable: {unavailable_reason}"
            )
    return _kernel
