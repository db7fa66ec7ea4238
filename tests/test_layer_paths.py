"""MoLFLinear's fast paths against the plain ones: the merged LoRA branch vs one branch
per expert, and the fused path's shared CPU workspace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molf import MoLFConfig, MoLFLinear, get_molf_model
from molf.optim import cpu_kernel

needs_kernel = pytest.mark.skipif(
    cpu_kernel.load() is None, reason="no C compiler: the CPU kernel cannot be built"
)


def _per_expert(layer: MoLFLinear, x):
    """The plain dual path: one LoRA branch per expert, added one by one."""
    y = layer.base_layer(x)
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.scalings):
        y = y + nn.functional.linear(nn.functional.linear(x, a), b) * s
    return y


def _grads_of(layer, x, forward):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = forward(x)
    (y.float().sin() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach().float(), x.grad.float()] + [p.grad.float() for p in layer.parameters()]


@pytest.mark.parametrize("ranks", [(5,), (3, 6)])
@pytest.mark.parametrize("autocast", [False, True])
def test_merged_dual_branch_matches_one_branch_per_expert(ranks, autocast):
    torch.manual_seed(0)
    layer = MoLFLinear(nn.Linear(24, 20), ranks, tuple(0.5 + r for r in ranks), grad_path="dual")
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(3, 7, 24)
    exact = _grads_of(layer, x, lambda x: _per_expert(layer, x))  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fast = _grads_of(layer, x, layer)
        plain = _grads_of(layer, x, lambda x: _per_expert(layer, x))
    for f, p, e in zip(fast, plain, exact):
        if autocast:  # bf16 rounds either way: the merged branch must not round worse
            assert (f - e).norm() <= 2 * (p - e).norm() + 1e-2 * e.norm()
        else:
            assert (f - p).norm() <= 1e-5 * p.norm()


def _deep_mlp(path, seed=0, width=1):
    torch.manual_seed(seed)
    d = [48 * width, 40 * width, 64 * width]
    model = nn.Sequential(
        nn.Linear(d[0], d[1]), nn.GELU(), nn.Linear(d[1], d[2]), nn.GELU(), nn.Linear(d[2], d[0])
    )
    model = get_molf_model(model, MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 8)))
    for m in model.modules():
        if isinstance(m, MoLFLinear):
            m.grad_path = path
            with torch.no_grad():
                for b in m.lora_B:
                    b.normal_(0, 0.1)
    return model


def _model_grads(model, x, checkpoint=False):
    model.zero_grad(set_to_none=True)
    if checkpoint:
        y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    else:
        y = model(x)
    y.square().sum().backward()
    return [y.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("checkpoint", [False, True])
def test_fused_path_workspace_is_shared_safely_between_layers(checkpoint):
    """Layers of different shapes reuse one W' buffer, forward and backward."""
    x = torch.randn(5, 48)
    fused = _model_grads(_deep_mlp("fused"), x, checkpoint)
    dual = _model_grads(_deep_mlp("dual"), x, checkpoint)
    for f, d in zip(fused, dual):
        torch.testing.assert_close(f, d, rtol=1e-5, atol=1e-5 * float(d.abs().max()))


def test_fused_path_in_two_threads_at_once():
    """The W' workspace is per thread: two trainings at once do not see each other."""
    import threading

    xs = [torch.randn(64, 384, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    models = [_deep_mlp("fused", seed=i, width=8) for i in range(2)]  # global RNG: not in threads
    expected = [_model_grads(models[i], xs[i]) for i in range(2)]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                got = _model_grads(models[i], xs[i])
                if not all(torch.equal(g, e) for g, e in zip(got, expected[i])):
                    errors.append(f"thread {i}: results differ")
                    return
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
