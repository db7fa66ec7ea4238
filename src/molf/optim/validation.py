"""What MoLFAdamW refuses, and the message it refuses with (:class:`MolfError`).

* Hyperparameters, at construction: non-negative learning rates, weight decays and
  ``eps``, ``betas`` in ``[0, 1)``, a known ``implementation``; ``betas`` and ``eps``
  again at every step, since a schedule may change them.
* float16 parameters, at construction and when a parameter's state is created: their
  Adam moments underflow.
* Optimizer state, twice: a whole state dict before ``load_state_dict`` hands it to
  torch (which checks only the counts; a wrong-shaped moment would make the step crash
  or a kernel write out of bounds), and each parameter's state when the step gathers
  its tensors anew, dtype included, before a kernel writes through it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from molf.errors import MolfError
from molf.optim.functional import local_shard
from molf.optim.implementations import IMPLEMENTATIONS

FLOAT16_MESSAGE = (
    "MoLFAdamW: float16 parameters are not supported: use bf16 or fp32 (or amp: fp32 "
    "weights under torch.autocast(dtype=torch.float16)); float16 Adam moments underflow "
    "({} is float16)"
)
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")  # what MoLFAdamW keeps per parameter

_LOAD = "MoLFAdamW.load_state_dict"
_NOT_OURS = "the state is not a MoLFAdamW state: load one that MoLFAdamW.state_dict() saved"


def check_hyperparameters(implementation: str, betas, eps, values: dict[str, float]) -> None:
    """Every value in ``values`` and ``eps`` a non-negative number, ``betas`` and
    ``eps`` as :func:`check_betas_eps` wants, ``implementation`` one of
    :data:`IMPLEMENTATIONS`."""
    for name, value in {**values, "eps": eps}.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise MolfError(f"MoLFAdamW: {name} must be a non-negative number, got {value!r}")
    check_betas_eps(betas, eps)
    if implementation not in IMPLEMENTATIONS:
        raise MolfError(
            f"MoLFAdamW: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )


def check_betas_eps(betas, eps) -> None:
    """``0 <= beta1, beta2 < 1`` and ``eps >= 0``."""
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise MolfError(f"MoLFAdamW: betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise MolfError(f"MoLFAdamW: eps must be a non-negative number, got {eps!r}")


def check_no_float16(model: nn.Module) -> None:
    """Refuse a model with a trainable float16 parameter (naming the first)."""
    half = next(
        (n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16),
        None,
    )
    if half is not None:
        raise MolfError(FLOAT16_MESSAGE.format(half))


def _shape(t: Tensor) -> tuple[int, ...]:
    """The shape the step works on: an FSDP2 DTensor's local shard's."""
    return tuple(local_shard(t).shape)


def state_problem(param: Tensor, state: object, same_dtype: bool) -> str | None:
    """What is wrong with one parameter's state, or ``None``: it must be a dict holding
    ``step`` (a 0-d tensor) and ``exp_avg`` / ``exp_avg_sq`` (tensors of the
    parameter's shape, its local shard's under FSDP2, and of a floating dtype), or be
    empty (not stepped yet: the step creates it). With ``same_dtype`` (as the step
    needs them) the moments must also have the parameter's dtype; on loading, torch
    casts floating state to it."""
    if not isinstance(state, dict):
        return f"the state is of type {type(state).__name__}, not a dict; {_NOT_OURS}"
    if not state:
        return None
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        kept = ", ".join(_STATE_KEYS)
        return f"the state has no {', '.join(missing)} (MoLFAdamW keeps {kept}); {_NOT_OURS}"
    for key in _STATE_KEYS:
        if not isinstance(state[key], Tensor):
            return f"{key} is of type {type(state[key]).__name__}, not a tensor; {_NOT_OURS}"
    step_shape = tuple(state["step"].shape)
    if step_shape:
        return f"step has shape {step_shape}, expected a scalar (shape ()); {_NOT_OURS}"
    for key in ("exp_avg", "exp_avg_sq"):
        value = state[key]
        if _shape(value) != _shape(param):
            return (
                f"{key} has shape {_shape(value)}, the parameter {_shape(param)}; the state is "
                "from another model or another LoRA rank"
            )
        if not value.is_floating_point():
            return f"{key} has dtype {value.dtype}, the parameter {param.dtype}; {_NOT_OURS}"
        if same_dtype and value.dtype != param.dtype:
            return (
                f"{key} has dtype {value.dtype}, the parameter {param.dtype}; the parameter's "
                "dtype changed after its state was made: load the state again "
                "(optimizer.load_state_dict(optimizer.state_dict())) to cast it"
            )
    return None


def check_state_dict(param_groups: list[dict], names: dict[int, str], state_dict: dict) -> None:
    """Refuse (naming the first problem) a state dict that does not fit an optimizer
    with ``param_groups``: another number of parameter groups, a group of another name
    or with another number of parameters (:func:`check_groups`), state for a parameter
    no group lists, or a parameter's state that :func:`state_problem` finds wrong.
    ``names`` maps ``id(param)`` to its name in the model, for messages."""
    saved, state = state_dict.get("param_groups"), state_dict.get("state")
    if not isinstance(saved, list) or not isinstance(state, dict):
        raise MolfError(
            f"{_LOAD}: not an optimizer state dict (it needs 'state' and "
            "'param_groups'); pass what MoLFAdamW.state_dict() returned"
        )
    check_groups(param_groups, saved)
    index = {
        pid: (g, i)
        for g, group in enumerate(saved)
        for i, pid in enumerate(group.get("params", ()))
    }
    for pid, param_state in state.items():
        if pid not in index:
            raise MolfError(
                f"{_LOAD}: the state has an entry for parameter {pid!r}, which no "
                f"parameter group lists; {_NOT_OURS}"
            )
        g, i = index[pid]
        problem = state_problem(param_groups[g]["params"][i], param_state, False)
        if problem is not None:
            raise MolfError(f"{_LOAD}: {where(param_groups, names, g, i)}: {problem}")


def check_groups(param_groups: list[dict], saved: list[dict]) -> None:
    """The saved parameter groups match ``param_groups``: as many, each with the same
    name (where both have one) and as many parameters."""
    mine = [(g.get("name"), len(g["params"])) for g in param_groups]
    theirs = [(g.get("name"), len(g.get("params", ()))) for g in saved]
    fix = (
        "the state is from another model or MoLF config (lora_ranks, train_base, train_non_linear)"
    )
    if len(theirs) != len(mine):
        raise MolfError(
            f"{_LOAD}: the state has {len(theirs)} parameter groups "
            f"({', '.join(str(n) for n, _ in theirs)}), this optimizer {len(mine)} "
            f"({', '.join(str(n) for n, _ in mine)}); {fix}"
        )
    for g, ((name, count), (saved_name, saved_count)) in enumerate(zip(mine, theirs)):
        if None not in (name, saved_name) and name != saved_name:
            raise MolfError(
                f"{_LOAD}: group {g} is {saved_name!r} in the state, {name!r} here; {fix}"
            )
        if saved_count != count:
            raise MolfError(
                f"{_LOAD}: group {g} ({name}) has {saved_count} parameters in the "
                f"state, {count} here; {fix}"
            )


def check_param_state(
    param_groups: list[dict], names: dict[int, str], param: Tensor, group: int, state: dict
) -> None:
    """Refuse a parameter's existing state that the step cannot use
    (:func:`state_problem`, dtype included): checked when the step gathers its tensors
    anew, i.e. after loading, not every step."""
    problem = state_problem(param, state, True)
    if problem is not None:
        index = next(i for i, q in enumerate(param_groups[group]["params"]) if q is param)
        raise MolfError(f"MoLFAdamW.step: {where(param_groups, names, group, index)}: {problem}")


def where(param_groups: list[dict], names: dict[int, str], group: int, index: int) -> str:
    """``group 2 (lora0), parameter 3 (model.layers.0.mlp.up_proj.lora_A.0)``, for
    messages (the name where ``names`` has it)."""
    g = param_groups[group]
    name = names.get(id(g["params"][index]))
    return f"group {group} ({g.get('name', '?')}), parameter {index}" + (
        f" ({name})" if name else ""
    )
