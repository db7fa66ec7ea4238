"""The routed step as a fused CPU kernel (``implementation="cpu_kernel"``), compiled on first use.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from molf.errors import MolfError
from molf.optim.functional import AllReduce, Layout, check_sizes, check_state, plain_float32

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


# The C functions' parameters (cpu_kernel.c), in order; declared once, here.
_PTR, _F64, _I32 = ctypes.c_void_p, ctypes.c_double, ctypes.c_int
_SIGNATURES = {
    "molf_nonfinite": [_I32, _PTR, _PTR, _PTR, _I32],  # n, g, numel, out, nthreads
    "molf_step": [
        *[_I32, _PTR, _I32, _I32],  # n_mod, mod_start, E, k
        *[_PTR] * 5,  # p, g, m, v, step: arrays of data pointers
        *[_PTR] * 7,  # numel, cell, lr, wd, cell_size, participating, found_inf
        *[_F64, _F64, _F64, _I32],  # beta1, beta2, eps, pfn
        *[_PTR, _PTR, _I32],  # scores, selected, nthreads
    ],
}


def _ptrs(tensors: list[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def _numel(tensors: list[Tensor]) -> Tensor:
    return torch.tensor([t.numel() for t in tensors], dtype=torch.int64)


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("molf CPU kernel: out of memory for its chunk tables")


def _layout_problem(layout: Layout, count: int) -> str | None:
    """Why ``molf_step``'s indexing could leave ``layout``'s tables for ``count`` routed
    tensors (``None``: it cannot): the tables are contiguous CPU tensors of the types C
    reads, with ``M x E`` cells; ``module_starts`` runs from 0 to ``count`` without
    going down; each module's tensors have cells in that module's row."""
    starts, cells, num_cells = layout.module_starts, layout.cell_index, layout.num_cells
    num_modules = starts.numel() - 1
    per_module = num_cells // max(num_modules, 1)
    typed = ((starts, torch.int64), (cells, torch.int64), (layout.cell_sizes, torch.float32))
    if not layout.participating.is_cpu or not all(
        t.is_cpu and t.is_contiguous() and t.dtype is d for t, d in typed
    ):
        return "its tables must be contiguous CPU tensors (int64 indices, float32 cell sizes)"
    if num_modules < 0 or num_cells != num_modules * per_module:
        return f"{num_cells} cells are not {num_modules} modules x {per_module} experts"
    if layout.participating.numel() != num_cells:
        return f"participating has {layout.participating.numel()} entries for {num_cells} cells"
    runs = starts.diff()
    if cells.numel() != count or int(starts[0]) != 0 or int(starts[-1]) != count:
        return f"it places {cells.numel()} tensors, up to {int(starts[-1])}; the step has {count}"
    if bool((runs < 0).any()):
        return "module_starts goes down"
    rows = torch.repeat_interleave(torch.arange(num_modules), runs)
    if count and (
        per_module == 0 or not torch.equal(cells.div(per_module, rounding_mode="floor"), rows)
    ):
        return "a tensor's cell is outside its module's row"
    return None


@dataclass
class _Tables:
    """What ``molf_step`` reads besides this step's parameters and gradients, checked
    and built once per :class:`Layout` (:func:`_tables`)."""

    sizes: list[int]  # each routed tensor's size: params and grads are checked against it
    numel: Tensor  # the same, int64, for C
    state_ptrs: list[Tensor]  # data pointers of the exp_avgs, exp_avg_sqs and step counts
    participating: Tensor  # uint8 [M * E]
    state: tuple[list[Tensor], ...]  # the tensors those pointers point into, held alive


def _tables(
    layout: Layout,
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
) -> _Tables:
    """The state's pointer tables, after checking that no ``molf_step`` over this layout
    and state can write out of bounds (:func:`check_state`, :func:`_layout_problem`)."""
    sizes = check_state(Kernel.name, params, exp_avgs, exp_avg_sqs, state_steps)
    problem = _layout_problem(layout, len(sizes))
    if problem is not None:  # molf builds layouts: a bug, not the user's doing
        raise ValueError(f"molf CPU kernel: the layout does not fit the step: {problem}")
    state = (list(exp_avgs), list(exp_avg_sqs), list(state_steps))
    return _Tables(
        sizes=sizes,
        numel=torch.tensor(sizes, dtype=torch.int64),
        state_ptrs=[_ptrs(ts) for ts in state],
        participating=layout.participating.to(torch.uint8).contiguous(),
        state=state,
    )


def _check_call(
    tables: _Tables,
    params: list[Tensor],
    grads: list[Tensor],
    lrs: list[float],
    weight_decays: list[float],
    found_inf: Tensor,
) -> None:
    """Before every ``molf_step``: this step's parameters and gradients have the sizes
    of their state (:func:`check_sizes`), there is one lr and weight decay per tensor,
    and ``found_inf`` is one float32 on the CPU."""
    check_sizes(Kernel.name, "parameter", params, tables.sizes)
    check_sizes(Kernel.name, "gradient", grads, tables.sizes)
    count = len(tables.sizes)
    if len(lrs) != count or len(weight_decays) != count:
        raise ValueError(
            f"molf CPU kernel: {len(lrs)} lrs and {len(weight_decays)} weight decays for "
            f"{count} tensors"
        )
    if found_inf.dtype is not torch.float32 or not found_inf.is_cpu or found_inf.numel() != 1:
        raise MolfError(
            f"MoLFAdamW (cpu_kernel): found_inf must be one float32 on the CPU, got "
            f"{found_inf.dtype} of shape {tuple(found_inf.shape)} on {found_inf.device}; "
            "pass step(grad_norm=...) a norm on the parameters' device"
        )


class Kernel:
    """The routed step in compiled C loops (see the module docstring), on contiguous
    float32 CPU tensors; passes 2 and 3 are fused, so it takes no ``all_reduce``."""

    name = "cpu_kernel"
    fuses_routing = True

    def __init__(self, lib: ctypes.CDLL, openmp: bool) -> None:
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        self._lib = lib
        self.openmp = openmp

    def supports(self, *tensor_lists: list[Tensor]) -> bool:
        return plain_float32(tensor_lists, on_cpu=True)

    def nonfinite(self, grads: list[Tensor]) -> Tensor:
        out = torch.empty((), dtype=torch.float32)
        g, n = _ptrs(grads), _numel(grads)
        threads = torch.get_num_threads()
        _check(
            self._lib.molf_nonfinite(
                len(grads), g.data_ptr(), n.data_ptr(), out.data_ptr(), threads
            )
        )
        return out

    def routed_step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        lrs: list[float],
        weight_decays: list[float],
        layout: Layout,
        found_inf: Tensor,
        *,
        beta1: float,
        beta2: float,
        eps: float,
        score: str,
        top_k: int,
        all_reduce: AllReduce | None = None,
    ) -> tuple[Tensor, Tensor]:
        if all_reduce is not None:
            raise ValueError("the CPU kernel routes inside its loop: it cannot take all_reduce")
        num_cells = layout.num_cells
        num_modules = layout.module_starts.numel() - 1
        scores = torch.empty(num_cells, dtype=torch.float32)
        selected = torch.empty(num_cells, dtype=torch.uint8)
        tables = layout.state_tables.get(self.name)
        if tables is None:  # the state's pointers and sizes: fixed while the layout is
            tables = layout.state_tables[self.name] = _tables(
                layout, params, exp_avgs, exp_avg_sqs, state_steps
            )
        _check_call(tables, params, grads, lrs, weight_decays, found_inf)
        ptrs = [_ptrs(params), _ptrs(grads), *tables.state_ptrs]  # a user may swap a param's data
        lr = torch.tensor(lrs, dtype=torch.float64)
        wd = torch.tensor(weight_decays, dtype=torch.float64)
        status = self._lib.molf_step(
            num_modules,
            layout.module_starts.data_ptr(),
            num_cells // max(num_modules, 1),
            top_k,
            *[p.data_ptr() for p in ptrs],
            tables.numel.data_ptr(),
            layout.cell_index.data_ptr(),
            lr.data_ptr(),
            wd.data_ptr(),
            layout.cell_sizes.data_ptr(),
            tables.participating.data_ptr(),
            found_inf.data_ptr(),
            beta1,
            beta2,
            eps,
            int(score == "pfn"),
            scores.data_ptr(),
            selected.data_ptr(),
            torch.get_num_threads(),
        )
        _check(status)
        shape = layout.participating.shape
        return scores.view(shape), selected.bool().view(shape)


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
