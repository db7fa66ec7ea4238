"""MoLFAdamW refuses optimizer state that does not fit it, on loading and before its
kernels write through raw pointers (issue 20, item 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_model

from molf import MoLFAdamW, MoLFConfig, MolfError, get_molf_model
from molf.optim import cpu_kernel
from molf.optim.functional import Layout

needs_kernel = pytest.mark.skipif(
    cpu_kernel.load() is None, reason="no C compiler: the CPU kernel cannot be built"
)
IMPLEMENTATIONS = [
    "reference",
    "foreach",
    pytest.param("cpu_kernel", marks=needs_kernel),
]
LORA_A = "model.layers.0.self_attn.q_proj.lora_A.0"  # parameter 0 of group 1, lora0
LORA_B = "model.layers.0.self_attn.q_proj.lora_B.0"


def _model(rank: int = 4, **config) -> torch.nn.Module:
    config = {"lora_ranks": (rank,), "lora_alphas": (8,), "top_k": 1, **config}
    return get_molf_model(tiny_model(), MoLFConfig(**config))


def _step(model: torch.nn.Module, opt: MoLFAdamW, step: int) -> None:
    model.zero_grad(set_to_none=True)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
    model(x, labels=x).loss.backward()
    opt.step()


def _trained(rank: int = 4, implementation: str = "foreach", **config):
    """A model and its optimizer after one step."""
    model = _model(rank, **config)
    opt = MoLFAdamW(model, lr=1e-2, implementation=implementation)
    _step(model, opt, 0)
    return model, opt


def _lora_a(model: torch.nn.Module) -> torch.nn.Parameter:
    return dict(model.named_parameters())[LORA_A]


def _snapshot(model: torch.nn.Module, opt: MoLFAdamW) -> tuple[dict, dict, list]:
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: v.clone() for k, v in opt.state[p].items()}
        for n, p in model.named_parameters()
        if p in opt.state
    }
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return weights, state, hyper


def _assert_unchanged(model: torch.nn.Module, opt: MoLFAdamW, snapshot) -> None:
    weights, state, hyper = snapshot
    assert hyper == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
        now, then = opt.state.get(p, {}), state.get(n, {})
        assert now.keys() == then.keys(), n
        for k, v in then.items():
            assert torch.equal(now[k], v), (n, k)


def _refused_and_still_trains(implementation: str, bad_state: dict, match: str) -> None:
    """Loading ``bad_state`` raises MolfError and leaves the optimizer as it was: it
    then trains exactly like a twin that never saw the bad state."""
    model, opt = _trained(4, implementation)
    twin = copy.deepcopy(model)
    twin_opt = MoLFAdamW(twin, lr=1e-2, implementation=implementation)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = _snapshot(model, opt)
    with pytest.raises(MolfError, match=match):
        opt.load_state_dict(bad_state)
    _assert_unchanged(model, opt, before)
    for step in (1, 2):
        _step(model, opt, step)
        _step(twin, twin_opt, step)
    assert opt.last_implementation == implementation
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------- load_state_dict


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_state_of_another_lora_rank_is_refused(implementation):
    _, other = _trained(8, implementation)
    message = (
        rf"^MoLFAdamW\.load_state_dict: group 1 \(lora0\), parameter 0 \({LORA_A}\): "
        r"exp_avg has shape \(8, 32\), the parameter \(4, 32\); the state is from another "
        r"model or another LoRA rank$"
    )
    _refused_and_still_trains(implementation, other.state_dict(), message)


def test_state_of_a_smaller_lora_rank_is_refused():
    """The reproduced case: a rank-1 state into a rank-8 optimizer (the C kernel updated
    one row of eight; foreach crashed)."""
    _, small = _trained(1)
    opt = MoLFAdamW(_model(8), lr=1e-2)
    with pytest.raises(MolfError, match=r"exp_avg has shape \(1, 32\), the parameter \(8, 32\)"):
        opt.load_state_dict(small.state_dict())
    assert not opt.state


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_moments_of_a_non_floating_dtype_are_refused(implementation):
    _, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    first = sd["param_groups"][1]["params"][0]
    sd["state"][first]["exp_avg_sq"] = sd["state"][first]["exp_avg_sq"].long()
    match = (
        rf"parameter 0 \({LORA_A}\): exp_avg_sq has dtype torch\.int64, the parameter "
        r"torch\.float32; the state is not a MoLFAdamW state"
    )
    _refused_and_still_trains(implementation, sd, match)


def test_floating_state_of_another_dtype_is_cast_to_the_parameters_as_torch_does():
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].double(), st["exp_avg_sq"].double()
    twin = copy.deepcopy(model)
    twin_opt = MoLFAdamW(twin, lr=1e-2, implementation="foreach")
    twin_opt.load_state_dict(sd)
    assert {st["exp_avg"].dtype for st in twin_opt.state.values()} == {torch.float32}
    for step in (1, 2):
        _step(model, opt, step)
        _step(twin, twin_opt, step)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_an_empty_state_for_a_parameter_is_accepted_as_torch_does():
    """``{}`` is a parameter not stepped yet (torch's optimizers save such entries):
    the next step creates its state."""
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    first = sd["param_groups"][1]["params"][0]
    sd["state"][first] = {}
    opt.load_state_dict(sd)
    _step(model, opt, 1)
    assert float(opt.state[_lora_a(model)]["step"]) == 1.0
    assert float(opt.state[dict(model.named_parameters())[LORA_B]]["step"]) == 2.0


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (  # another number of LoRA experts: another number of groups
            dict(lora_ranks=(4, 8), lora_alphas=(8, 8)),
            r"the state has 5 parameter groups \(fft, lora0, lora1, other, other_no_decay\), "
            r"this optimizer 4 \(fft, lora0, other, other_no_decay\); the state is from another "
            r"model or MoLF config \(lora_ranks, train_base, train_non_linear\)$",
        ),
        (  # the same number of groups, another one of them
            dict(train_base=False, train_non_linear=True, lora_ranks=(4, 8), lora_alphas=(8, 8)),
            r"group 0 is 'lora0' in the state, 'fft' here",
        ),
        (  # the same groups, more layers
            dict(num_hidden_layers=3),
            r"group 0 \(fft\) has 21 parameters in the state, 14 here; the state is from "
            r"another model or MoLF config",
        ),
    ],
    ids=["group-count", "group-name", "parameter-count"],
)
def test_state_of_another_group_structure_is_refused(config, match):
    layers = config.pop("num_hidden_layers", 2)
    other = get_molf_model(
        tiny_model(num_hidden_layers=layers),
        MoLFConfig(**{"lora_ranks": (4,), "lora_alphas": (8,), **config}),
    )
    other_opt = MoLFAdamW(other, lr=1e-2)
    _step(other, other_opt, 0)
    _refused_and_still_trains("foreach", other_opt.state_dict(), match)


def _first_state(sd: dict) -> dict:
    return sd["state"][sd["param_groups"][1]["params"][0]]


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (
            lambda sd: _first_state(sd).pop("exp_avg_sq"),
            r"the state has no exp_avg_sq \(MoLFAdamW keeps step, exp_avg, exp_avg_sq\)",
        ),
        (
            lambda sd: _first_state(sd).update(step=torch.zeros(1)),
            r"step has shape \(1,\), expected a scalar \(shape \(\)\)",
        ),
        (
            lambda sd: _first_state(sd).update(step=3),
            r"step is of type int, not a tensor",
        ),
        (
            lambda sd: sd["state"].update({10_000: _first_state(sd)}),
            r"an entry for parameter 10000, which no parameter group lists",
        ),
        (lambda sd: sd.pop("param_groups"), r"not an optimizer state dict"),
    ],
    ids=["missing-key", "step-shape", "step-type", "unknown-parameter", "no-groups"],
)
def test_a_malformed_state_dict_is_refused(corrupt, match):
    _, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    _refused_and_still_trains("foreach", sd, match)


# ---------------------------------------------------------------- state replaced after loading


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_moment_replaced_after_loading_is_refused_before_any_write(implementation):
    """A smaller exp_avg put in after loading: the step refuses it when it gathers the
    state anew, before any kernel writes (the C kernel wrote past it)."""
    model, opt = _trained(4, implementation)
    opt.load_state_dict(opt.state_dict())
    opt.state[_lora_a(model)]["exp_avg"] = torch.zeros(1, 32)
    model.zero_grad()
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    model(x, labels=x).loss.backward()
    before = _snapshot(model, opt)
    with pytest.raises(
        MolfError,
        match=rf"^MoLFAdamW\.step: group 1 \(lora0\), parameter 0 \({LORA_A}\): exp_avg has "
        r"shape \(1, 32\), the parameter \(4, 32\)",
    ):
        opt.step()
    _assert_unchanged(model, opt, before)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_moment_of_another_dtype_replaced_after_loading_is_refused(implementation):
    model, opt = _trained(4, implementation)
    opt.load_state_dict(opt.state_dict())
    st = opt.state[_lora_a(model)]
    st["exp_avg_sq"] = st["exp_avg_sq"].double()
    model.zero_grad()
    x = torch.randint(0, 96, (2, 12))
    model(x, labels=x).loss.backward()
    with pytest.raises(MolfError, match=r"exp_avg_sq has dtype torch\.float64, the parameter "):
        opt.step()
    opt.load_state_dict(opt.state_dict())  # the fix the message gives: loading casts it
    opt.step()
    assert st["exp_avg_sq"].dtype is torch.float64  # (the old dict; the optimizer's is new)
    assert opt.state[_lora_a(model)]["exp_avg_sq"].dtype is torch.float32


# ---------------------------------------------------------------- the C kernel itself


def _layout(**changes) -> Layout:
    """2 modules x 2 experts: each module's FFT weight, then its LoRA A and B."""
    fields = dict(
        cell_index=torch.tensor([0, 1, 1, 2, 3, 3]),
        module_starts=torch.tensor([0, 3, 6]),
        cell_sizes=torch.tensor([30.0, 22.0, 30.0, 22.0]),
        participating=torch.ones(2, 2, dtype=torch.bool),
    )
    return Layout(**{**fields, **changes})


def _kernel_call() -> dict:
    """The arguments of one routed step over :func:`_layout`: the FFT weight (6, 5) and
    LoRA A (2, 5), B (6, 2) of each module."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (2, 5), (6, 2)] * 2
    params = [torch.randn(s, generator=gen) for s in shapes]
    args = dict(
        params=params,
        grads=[torch.randn(s, generator=gen) for s in shapes],
        exp_avgs=[torch.zeros(s) for s in shapes],
        exp_avg_sqs=[torch.zeros(s) for s in shapes],
        state_steps=[torch.zeros(()) for _ in shapes],
        lrs=[1e-2] * 6,
        weight_decays=[0.0] * 6,
        layout=_layout(),
        found_inf=torch.zeros(()),
    )
    return args


HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, score="epd", top_k=1)


def _run_kernel(args: dict):
    return cpu_kernel.load().routed_step(**args, **HYPER)


@needs_kernel
def test_cpu_kernel_takes_a_state_that_fits():
    args = _kernel_call()
    _, selected = _run_kernel(args)
    assert selected.sum(1).tolist() == [1, 1]
    assert all(float(s) == 1.0 for s in args["state_steps"])


@needs_kernel
@pytest.mark.parametrize(
    ("replace", "match"),
    [
        (
            lambda a: a["exp_avgs"].__setitem__(1, torch.zeros(1, 5)),
            r"routed tensor 1: exp_avg has 5 elements, its parameter 10",
        ),
        (
            lambda a: a["exp_avg_sqs"].__setitem__(4, torch.zeros(2, 5, dtype=torch.float64)),
            r"routed tensor 4: exp_avg_sq is torch\.float64, not torch\.float32",
        ),
        (
            lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(5, 6).t()),
            r"routed tensor 0: exp_avg is not contiguous",
        ),
        (
            lambda a: a["state_steps"].__setitem__(2, torch.zeros(0)),
            r"routed tensor 2: step has 0 elements, its parameter 1",
        ),
        (lambda a: a["state_steps"].pop(), r"6 parameters but 6 exp_avg, 6 exp_avg_sq and 5 step"),
        (
            lambda a: a["params"].__setitem__(3, torch.zeros(1, 5)),
            r"routed tensor 3: exp_avg has 30 elements, its parameter 5",  # (a layout's 1st call)
        ),
        (
            lambda a: a["grads"].__setitem__(5, torch.zeros(6)),
            r"routed tensor 5: the gradient has 6 elements, its state 12",
        ),
        (
            lambda a: a.update(found_inf=torch.zeros((), dtype=torch.float64)),
            r"found_inf must be one float32 on the CPU, got torch\.float64",
        ),
    ],
    ids=[
        "small-exp_avg",
        "float64-exp_avg_sq",
        "strided-exp_avg",
        "empty-step",
        "missing-step",
        "small-param",
        "small-grad",
        "float64-found_inf",
    ],
)
def test_cpu_kernel_refuses_buffers_it_would_overrun(replace, match):
    """Each case raises MolfError before C runs: no tensor changed."""
    args = _kernel_call()
    replace(args)
    before = copy.deepcopy(args)
    with pytest.raises(MolfError, match=match):
        _run_kernel(args)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for a, b in zip(args[key], before[key]):
            assert torch.equal(a, b), key


@needs_kernel
def test_cpu_kernel_checks_parameters_every_call_and_the_state_once_per_layout():
    """The state's pointer tables are kept with the layout (checked when built); the
    parameters and gradients, whose data a user may swap, are checked on every call."""
    args = _kernel_call()
    _run_kernel(args)
    args["params"][3].data = torch.zeros(2, 5)
    with pytest.raises(MolfError, match=r"routed tensor 3: the parameter has 10 elements"):
        _run_kernel(args)


@needs_kernel
@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (dict(cell_index=torch.tensor([0, 1, 1, 2, 3, 1])), r"outside its module's row"),
        (dict(cell_index=torch.tensor([0, 1, 1, 2, -1, 3])), r"outside its module's row"),
        (dict(module_starts=torch.tensor([0, 4, 6])), r"outside its module's row"),
        (dict(module_starts=torch.tensor([0, 3, 5])), r"places 6 tensors, up to 5"),
        (dict(module_starts=torch.tensor([0, 7, 6])), r"module_starts goes down"),
        (dict(cell_sizes=torch.ones(3)), r"3 cells are not 2 modules x 1 experts"),
        (dict(participating=torch.ones(2, 3, dtype=torch.bool)), r"participating has 6"),
        (dict(cell_index=torch.tensor([0, 1, 1, 2, 3, 3], dtype=torch.int32)), r"int64"),
    ],
    ids=[
        "cell-row",
        "negative-cell",
        "starts",
        "short-starts",
        "starts-down",
        "cells",
        "part",
        "int32",
    ],
)
def test_cpu_kernel_refuses_a_layout_it_would_index_out_of(layout, match):
    args = _kernel_call()
    args["layout"] = _layout(**layout)
    with pytest.raises(ValueError, match=match):
        _run_kernel(args)


# ---------------------------------------------------------------- Triton (where installed)


def test_triton_kernel_refuses_state_that_does_not_fit_before_launching():
    """The same checks before any launch (no GPU needed: nothing is launched)."""
    pytest.importorskip("triton")
    from molf.optim import triton_kernel

    args = _kernel_call()
    args["exp_avgs"][1] = torch.zeros(1, 5)
    kernel = triton_kernel.TritonKernel()
    with pytest.raises(MolfError, match=r"\(triton\): routed tensor 1: exp_avg has 5 elements"):
        kernel.routed_step(**args, **HYPER)
    args = _kernel_call()
    args["grads"][5] = torch.zeros(6)
    with pytest.raises(MolfError, match=r"\(triton\): routed tensor 5: the gradient has 6"):
        kernel.routed_step(**args, **HYPER)
