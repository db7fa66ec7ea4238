r"""The routed step: one signature for every implementation, and the pieces they share.

A *routed step* takes the experts' tensors of every MoLF layer, module by module (the
parameters, their gradients, Adam moments and step counts, per-tensor lr and weight
decay), a :class:`Layout` saying which ``[module, expert]`` cell each tensor belongs
to, and the hyperparameters; it

1. moves every expert's moments and step count (none of them when ``found_inf``),
2. scores each expert on the new, raw moments (EPD or PFN, see :mod:`molf.optim`),
   calling ``all_reduce`` on the per-cell score sums (FSDP2: each rank holds a shard),
3. selects each module's Top-K experts (:func:`select_top_k`) and applies the AdamW
   update to their tensors only,

and returns the ``[modules, experts]`` scores and selection. :class:`RoutedStep` is
that interface; ``reference``, ``foreach``, ``cpu_kernel`` and ``triton`` implement it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from molf.errors import MolfError

AllReduce = Callable[[Tensor], None]  # sums a tensor across ranks in place


@dataclass
class Routing:
    """The routing decision of the last step (read by logs and plots, never recomputed)."""

    modules: list[str]
    experts: list[str]
    scores: Tensor  # float [modules, experts], on the parameters' device
    selected: Tensor  # bool [modules, experts]; all False on a skipped step


@dataclass
class Layout:
    """Where each routed tensor sits in the ``[modules x experts]`` table; built once
    per set of parameters with gradients.

    ``state_tables`` is where an implementation may keep what it derives from the
    optimizer's state tensors (e.g. the C kernel's pointer tables): the optimizer
    creates and replaces those tensors only when it gathers anew, which also builds a
    new Layout, so such tables stay valid as long as their Layout (the kernels check
    the state when they build them: :func:`check_state`)."""

    cell_index: Tensor  # long [R]: m * E + e per routed tensor, non-decreasing
    module_starts: Tensor  # long [M + 1], on the CPU: module m owns tensors[starts[m]:starts[m+1]]
    cell_sizes: Tensor  # float [M * E]: N_e over the tensors with a gradient (at least 1)
    participating: Tensor  # bool [M, E]: the cell has a tensor with a gradient
    state_tables: dict[str, Any] = field(default_factory=dict)

    @property
    def num_cells(self) -> int:
        return self.cell_sizes.numel()


class RoutedStep(Protocol):
    """An implementation of the routed step (see the module docstring)."""

    name: str
    fuses_routing: bool  # no hook between scoring and routing: it cannot take all_reduce

    def supports(self, *tensor_lists: list[Tensor]) -> bool:
        """Whether it can work on these tensors in place."""

    def nonfinite(self, grads: list[Tensor]) -> Tensor:
        """A 0-d float32 tensor: 1 if any gradient holds a NaN or an infinity, else 0."""

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
        """Moments, scores, Top-K and the winners' update; returns ``(scores, selected)``,
        ``[M, E]`` each (nothing selected when ``found_inf``)."""


def select_top_k(scores: Tensor, participating: Tensor, k: int) -> Tensor:
    """Per row, the ``k`` highest finite scores among participating columns; ties go to
    the lower column index. A NaN or infinite score is never selected (a row without a
    finite score selects nothing). Sync-free: rank_i = #{j: s_j > s_i} + #{j < i: s_j = s_i}
    over the eligible columns, the others scoring -inf."""
    eligible = participating & scores.isfinite()
    s = scores.masked_fill(~eligible, float("-inf"))
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    n = s.shape[-1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=s.device).tril(-1)
    rank = (sj > si).sum(-1) + ((sj == si) & earlier).sum(-1)
    return (rank < k) & eligible


def route(
    partial: Tensor,
    layout: Layout,
    found_inf: Tensor,
    *,
    score: str,
    top_k: int,
    all_reduce: AllReduce | None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-tensor score sums (``lr * sum(m^2/(sqrt(v)+eps))`` for EPD,
    ``sum((m/(sqrt(v)+eps))^2)`` for PFN) to the experts' scores ``S = sums / N``
    (``sqrt`` of it for PFN), their Top-K selection (none when ``found_inf``) and the
    per-tensor update mask. Tensor ops only: no host sync."""
    sums = torch.zeros(layout.num_cells, dtype=partial.dtype, device=partial.device)
    sums.index_add_(0, layout.cell_index, partial)
    if all_reduce is not None:
        all_reduce(sums)
    scores = sums / layout.cell_sizes
    if score == "pfn":
        scores = scores.sqrt()
    scores = scores.view_as(layout.participating)
    selected = select_top_k(scores, layout.participating, top_k) & (found_inf == 0)
    return scores, selected, selected.flatten()[layout.cell_index]


def adamw_coefficients(
    steps: Tensor, lrs: Tensor, weight_decays: Tensor, *, beta1: float, beta2: float
) -> Tensor:
    r"""Per tensor, the three numbers of its AdamW update at step ``t`` (``steps``,
    counting this one), ``[P, 3]`` in float64 (``1 - beta2^t`` loses digits in float32):

    .. math::
        \theta \leftarrow \theta \cdot \underbrace{(1 - \mathrm{lr}\,\lambda)}_{\text{decay}}
            - \underbrace{\frac{\mathrm{lr}}{1-\beta_1^t}}_{\text{step size}}
              \frac{m}{\sqrt{v} \cdot \underbrace{(1-\beta_2^t)^{-1/2}}_{\text{rbc2}} + \epsilon}

    which is the bias-corrected update ``lr * m_hat / (sqrt(v_hat) + eps)``. ``t`` below
    1 counts as 1 (no 0/0 before the first step)."""
    t = steps.double().clamp_min(1.0)
    lrs, weight_decays = lrs.double(), weight_decays.double()
    return torch.stack(
        [1.0 - lrs * weight_decays, lrs / (1.0 - beta1**t), (1.0 - beta2**t).rsqrt()], dim=1
    )


def to_device(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list on ``device`` without waiting for it (pinned staging, asynchronous copy)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is an FSDP2 DTensor (by name: torch.distributed may be absent)."""
    return type(t).__name__ == "DTensor"


def local_shard(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor (a view), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plain_float32(tensor_lists: tuple[list[Tensor], ...], on_cpu: bool | None) -> bool:
    """Whether a kernel may work on these tensors in place: plain tensors (no subclass
    such as DTensor), contiguous, float32, on the CPU (``on_cpu``), off it (``False``)
    or anywhere (``None``). Called every step: one cheap pass, no device objects."""
    f32 = torch.float32
    return all(
        type(t) in _PLAIN_TYPES
        and t.dtype is f32
        and t.is_contiguous()
        and (on_cpu is None or t.is_cpu == on_cpu)
        for ts in tensor_lists
        for t in ts
    )


_STATE_FIX = (
    "the optimizer's state does not fit its parameters: load a state saved for this model "
    "(MoLFAdamW.load_state_dict checks it)"
)


def _buffer_problem(t: Tensor, numel: int, device: torch.device) -> str | None:
    """Why a kernel may not write ``numel`` float32 values through ``t``'s data pointer
    (``None``: it may)."""
    if type(t) not in _PLAIN_TYPES:
        return f"is a {type(t).__name__}, not a plain tensor"
    if t.dtype is not torch.float32:
        return f"is {t.dtype}, not torch.float32"
    if not t.is_contiguous():
        return "is not contiguous"
    if t.device != device:
        return f"is on {t.device}, its parameter on {device}"
    if t.numel() != numel:
        return f"has {t.numel()} elements, its parameter {numel}"
    return None


def check_state(
    impl: str,
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
) -> list[int]:
    """The parameters' sizes, once it is checked that a kernel (``impl``, for messages)
    can write through the state's raw pointers: one ``exp_avg``, ``exp_avg_sq`` and step
    count per parameter, the moments plain contiguous float32 tensors with the
    parameter's number of elements, the step counts one float32 each, all on the
    parameter's device. Raises :class:`MolfError` naming the first that is not. Run
    once per :class:`Layout`: the optimizer replaces its state only when it gathers
    anew, which builds a new Layout."""
    lengths = [len(ts) for ts in (params, exp_avgs, exp_avg_sqs, state_steps)]
    if len(set(lengths)) != 1:
        raise MolfError(
            f"MoLFAdamW ({impl}): {lengths[0]} parameters but {lengths[1]} exp_avg, "
            f"{lengths[2]} exp_avg_sq and {lengths[3]} step tensors; {_STATE_FIX}"
        )
    sizes = [p.numel() for p in params]
    for i, (p, n, m, v, s) in enumerate(zip(params, sizes, exp_avgs, exp_avg_sqs, state_steps)):
        for key, t, numel in (("exp_avg", m, n), ("exp_avg_sq", v, n), ("step", s, 1)):
            problem = _buffer_problem(t, numel, p.device)
            if problem is not None:
                raise MolfError(
                    f"MoLFAdamW ({impl}): routed tensor {i}: {key} {problem}; {_STATE_FIX}"
                )
    return sizes


def check_sizes(impl: str, what: str, tensors: list[Tensor], sizes: list[int]) -> None:
    """Before every kernel call: ``tensors`` (this step's parameters or gradients, named
    by ``what``) have the ``sizes`` that :func:`check_state` found their state to have
    (a user may replace a parameter's data). One pass over their sizes, no device
    work; their dtype, contiguity and device are what the kernel's ``supports``
    checks, which the optimizer calls every step."""
    found = list(map(Tensor.numel, tensors))
    if found == sizes:
        return
    if len(found) != len(sizes):
        raise MolfError(
            f"MoLFAdamW ({impl}): {len(found)} {what}s for the state of {len(sizes)}; {_STATE_FIX}"
        )
    i = next(i for i, (a, b) in enumerate(zip(found, sizes)) if a != b)
    raise MolfError(
        f"MoLFAdamW ({impl}): routed tensor {i}: the {what} has {found[i]} elements, its "
        f"state {sizes[i]}; a parameter's data was replaced (p.data = ...) after the optimizer "
        "made its state: give it back data of its shape, or build a new optimizer"
    )
