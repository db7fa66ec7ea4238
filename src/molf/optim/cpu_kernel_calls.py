"""The CPU kernel's calls (:mod:`molf.optim.cpu_kernel` builds and loads the library).

:class:`Kernel` is the routed step over the two C functions of ``cpu_kernel.c``, called
through ctypes with arrays of data pointers. C trusts what it is given, so before any
call writes through those pointers it checks that it cannot write out of bounds: the
state and the :class:`Layout` once per layout (:func:`_tables`, cached in
``layout.state_tables``), this step's parameters, gradients and ``found_inf`` every
call (:func:`_check_call`, a few Python comparisons, no tensor read).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from molf.errors import MolfError
from molf.optim.functional import AllReduce, Layout, check_sizes, check_state, plain_float32

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
