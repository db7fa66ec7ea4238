"""MoLFAdamW's fast paths against its plain one: the C kernel (and Triton, where it
runs) vs the foreach implementation."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from torch import nn

from molf import MoLFAdamW, MoLFConfig, MoLFLinear, get_molf_model
from molf.optim import cpu_kernel

needs_kernel = pytest.mark.skipif(
    cpu_kernel.load() is None, reason="no C compiler: the CPU kernel cannot be built"
)


def _mlp(seed=0):
    """Layers big enough for several kernel chunks (16384 floats) and its threads."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(300, 260), nn.GELU(), nn.Linear(260, 200))


def _step_twins(models, opts, make_grads, corrupt=None):
    """The same gradients into every model, then every optimizer steps."""
    grads = make_grads(models[0])
    if corrupt is not None:
        corrupt(grads)
    for model, opt in zip(models, opts):
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.clone()
        opt.step()


def _lm_grads(step):
    def make(model):
        model.zero_grad(set_to_none=True)
        x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
        x = x.to(next(model.parameters()).device)
        model(x, labels=x).loss.backward()
        return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]

    return make


def _mlp_grads(step):
    def make(model):
        model.zero_grad(set_to_none=True)
        x = torch.randn(64, 300, generator=torch.Generator().manual_seed(step))
        model(x).sin().sum().backward()
        return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]

    return make


def _assert_same(a, b, rtol=1e-6, atol=1e-7):
    ra, rb = a[1].last_routing, b[1].last_routing
    assert torch.equal(ra.selected, rb.selected)
    # foreach sums a score in float32 (order set by the thread count), the C kernel in
    # double: over ~1e5 terms they agree to a few float32 ulps of sqrt(N), not to 1e-5
    torch.testing.assert_close(ra.scores, rb.scores, rtol=5e-5, atol=1e-30)
    for (n, p), q in zip(a[0].named_parameters(), b[0].parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=n)
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        sa, sb = a[1].state.get(p, {}), b[1].state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            scale = float(sb[k].abs().max()) if sb[k].numel() else 0.0
            torch.testing.assert_close(
                sa[k], sb[k], rtol=rtol, atol=rtol * scale, msg=lambda m, k=k: f"{k}: {m}"
            )


KERNEL_CASES = {
    "epd-k1": dict(lora_ranks=(4,), lora_alphas=(8,), top_k=1, score="epd"),
    "pfn-k1": dict(lora_ranks=(4,), lora_alphas=(8,), top_k=1, score="pfn"),
    "epd-k2-three": dict(lora_ranks=(4, 8), lora_alphas=(8, 32), top_k=2, score="epd"),
    "pfn-k1-three": dict(lora_ranks=(4, 8), lora_alphas=(8, 32), top_k=1, score="pfn"),
    "epd-molf-e": dict(lora_ranks=(2, 8), lora_alphas=(10, 16), train_base=False),
}


def compare_on_a_language_model(impl: str, case: str, device: str = "cpu") -> None:
    """``impl`` and foreach, side by side for 14 steps, with a scheduler, a skipped step
    (a NaN) and a step where one expert has no gradient: the same routing, scores,
    weights and moments after every step."""
    base = get_molf_model(tiny_model("qwen2").to(device), MoLFConfig(**KERNEL_CASES[case]))
    twins = [base, copy.deepcopy(base)]
    kw = dict(lr=1e-2, lora_lr=6e-3, weight_decay=0.1, lora_weight_decay=0.01)
    opts = [MoLFAdamW(twins[0], implementation=impl, **kw)]
    opts.append(MoLFAdamW(twins[1], implementation="foreach", **kw))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** (s // 4)) for o in opts]
    layer = next(m for m in twins[0].modules() if isinstance(m, MoLFLinear))
    lora_b = [n for n, p in twins[0].named_parameters() if p is layer.lora_B[0]][0]
    names = [n for n, _ in twins[0].named_parameters()]
    selections = set()
    for step in range(14):
        corrupt = None
        if step == 5:  # a NaN anywhere: the whole step is skipped by both

            def corrupt(grads):
                grads[names.index(lora_b)][0, 0] = float("nan")

        if step == 8:  # an expert without a gradient takes no part

            def corrupt(grads):
                grads[names.index(lora_b)] = None

        _step_twins(twins, opts, _lm_grads(step), corrupt)
        for s in scheds:
            s.step()
        assert opts[0].last_implementation == impl
        assert opts[1].last_implementation == "foreach"
        _assert_same((twins[0], opts[0]), (twins[1], opts[1]))
        selections |= {tuple(r) for r in opts[0].last_routing.selected.tolist()}
        if step == 5:
            assert not opts[0].last_routing.selected.any()
    assert opts[0].skipped_steps == opts[1].skipped_steps == 1
    assert len(selections) > 1, "routing never changed: the comparison would miss a mix-up"


@needs_kernel
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_cpu_kernel_matches_foreach_on_a_language_model(case):
    compare_on_a_language_model("cpu_kernel", case)


def test_triton_kernel_matches_foreach_on_a_language_model():
    """On a GPU if there is one, else in Triton's interpreter on the CPU (a subprocess,
    since ``TRITON_INTERPRET`` must be set before the kernels are defined)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        for case in KERNEL_CASES:
            compare_on_a_language_model("triton", case, "cuda")
        return
    cases = ["epd-k2-three", "pfn-k1"]  # the interpreter is slow: two cases, both scores
    code = (
        "import optim.test_kernels as t\n"
        f"for c in {cases}: t.compare_on_a_language_model('triton', c)"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],  # tests/: helpers and this package
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@needs_kernel
@pytest.mark.parametrize("score", ["epd", "pfn"])
def test_kernel_matches_foreach_across_chunks_and_threads(score):
    """Tensors of several chunks, updated by more than one thread."""
    cfg = MoLFConfig(lora_ranks=(16, 64), lora_alphas=(16, 64), top_k=1, score=score)
    base = get_molf_model(_mlp(), cfg)
    twins = [base, copy.deepcopy(base)]
    opts = [
        MoLFAdamW(twins[0], lr=3e-3, lora_lr=1e-2, implementation="cpu_kernel"),
        MoLFAdamW(twins[1], lr=3e-3, lora_lr=1e-2, implementation="foreach"),
    ]
    for step in range(8):
        _step_twins(twins, opts, _mlp_grads(step))
        _assert_same((twins[0], opts[0]), (twins[1], opts[1]), rtol=2e-6)


@needs_kernel
def test_kernel_does_not_depend_on_the_thread_count():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model = get_molf_model(_mlp(), MoLFConfig(lora_ranks=(16,), lora_alphas=(16,)))
            opt = MoLFAdamW(model, lr=3e-3, implementation="cpu_kernel")
            for step in range(4):
                _step_twins([model], [opt], _mlp_grads(step))
            results.append((opt.last_routing.scores, [p.detach() for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@needs_kernel
def test_kernel_finds_every_non_finite_value():
    kernel = cpu_kernel.load()
    size = 3 * 16384 + 5  # several chunks and a ragged tail
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 16383, 16384, size - 1):
            grads = [torch.randn(7), torch.randn(size), torch.randn(3, 3)]
            grads[1][where] = bad
            assert kernel.nonfinite(grads).item() == 1.0, (bad, where)
    edge = torch.tensor([3.4e38, -3.4e38, 1e-45, -0.0, 0.0, 1.17e-38])
    assert kernel.nonfinite([edge, torch.randn(size)]).item() == 0.0


@needs_kernel
def test_kernel_falls_back_where_it_cannot_work_in_place():
    cfg = MoLFConfig(lora_ranks=(4,), lora_alphas=(8,))
    model = get_molf_model(tiny_model(), cfg)
    opt = MoLFAdamW(model, lr=1e-3)
    _step_twins([model], [opt], _lm_grads(0))
    assert opt.last_implementation == "cpu_kernel"

    def transposed(grads):  # a non-contiguous gradient of the right shape
        i = next(i for i, g in enumerate(grads) if g is not None and g.ndim == 2)
        grads[i] = grads[i].t().contiguous().t()

    model.zero_grad()
    grads = _lm_grads(1)(model)
    transposed(grads)
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.step()
    assert opt.last_implementation == "foreach"

    opt.all_reduce_hook = lambda sums: None  # the hook sits between passes 2 and 3
    _step_twins([model], [opt], _lm_grads(2))
    assert opt.last_implementation == "foreach"

    half = get_molf_model(tiny_model().to(torch.bfloat16), cfg)
    opt = MoLFAdamW(half, lr=1e-3)
    _step_twins([half], [opt], _lm_grads(0))
    assert opt.last_implementation == "foreach"


def test_foreach_implementation_is_used_on_request():
    model = get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    opt = MoLFAdamW(model, lr=1e-3, implementation="foreach")
    _step_twins([model], [opt], _lm_grads(0))
    assert opt.last_implementation == "foreach"


@pytest.mark.parametrize("impl", ["auto", "foreach"])
def test_a_step_where_only_plain_parameters_have_gradients(impl):
    model = get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    opt = MoLFAdamW(model, lr=1e-2, implementation=impl)
    inside = {id(p) for m in model.modules() if isinstance(m, MoLFLinear) for p in m.parameters()}
    _step_twins([model], [opt], _lm_grads(0))
    model.zero_grad(set_to_none=True)
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    model(x, labels=x).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        if id(p) in inside:
            p.grad = None
    opt.step()
    assert not opt.last_routing.selected.any()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (id(p) in inside), n
