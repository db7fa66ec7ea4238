"""MoLFLinear: the forward equation, initialisation, and dual vs fused gradient paths."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_model
from torch import nn

import molf.layer
from molf import MoLFAdamW, MoLFConfig, MoLFLinear, get_molf_model, molf_modules


def _layer(
    bias=True, ranks=(3, 5), alphas=(6.0, 2.0), rslora=True, path="auto", dtype=None, kept="auto"
):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias, dtype=dtype)
    cfg = MoLFConfig(lora_ranks=ranks, lora_alphas=alphas, use_rslora=rslora)
    layer = MoLFLinear(base, ranks, tuple(cfg.scalings()), grad_path=path, fused_weight=kept)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def test_forward_is_the_equation():
    layer = _layer()
    x = torch.randn(4, 7, 12)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ w.T + b
    for a, bb, r, alpha in zip(layer.lora_A, layer.lora_B, (3, 5), (6.0, 2.0)):
        expected = expected + (alpha / math.sqrt(r)) * (x @ a.T @ bb.T)
    for path, kept in (("dual", "auto"), ("fused", "keep"), ("fused", "recompute")):
        layer.grad_path, layer.fused_weight = path, kept
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_scalings_plain_and_rslora():
    assert MoLFConfig(lora_ranks=(16, 4), lora_alphas=(32, 8)).scalings() == [8.0, 4.0]
    assert MoLFConfig(lora_ranks=(16, 4), lora_alphas=(32, 8), use_rslora=False).scalings() == [
        2.0,
        2.0,
    ]


def test_fresh_wrap_is_identity_and_init_follows_kaiming():
    base = nn.Linear(64, 48)
    layer = MoLFLinear(base, (8,), (1.0,))
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert torch.count_nonzero(layer.lora_B[0]) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5): 1/sqrt(fan_in)
    a = layer.lora_A[0]
    assert a.shape == (8, 64) and a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    assert layer.lora_B[0].shape == (48, 8)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("frozen_base", [False, True])
@pytest.mark.parametrize("kept", ["keep", "recompute"])
def test_fused_and_dual_paths_give_the_same_gradients(bias, frozen_base, kept):
    grads = {}
    for path in ("dual", "fused"):
        layer = _layer(bias=bias, path=path, kept=kept)
        layer.base_layer.requires_grad_(not frozen_base)
        x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        (y.sin() * torch.arange(10.0)).sum().backward()
        grads[path] = {
            "x": x.grad,
            "y": y.detach(),
            **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None},
        }
    assert grads["dual"].keys() == grads["fused"].keys()
    assert len(grads["dual"]) == 2 + 4 + 2 * (not frozen_base) - (not bias and not frozen_base)
    for k in grads["dual"]:
        torch.testing.assert_close(
            grads["fused"][k],
            grads["dual"][k],
            rtol=1e-5,
            atol=1e-6 * grads["dual"][k].abs().max().item(),
            msg=k,
        )


@pytest.mark.parametrize("kept", ["keep", "recompute"])
@pytest.mark.parametrize("low_precision_build", [False, True])
def test_fused_path_in_bfloat16_and_under_autocast(kept, low_precision_build, monkeypatch):
    # the CPU builds autocast's W' in float32; accelerators from bf16 operands
    monkeypatch.setattr(molf.layer, "_builds_in_low_precision", lambda _: low_precision_build)
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        outs = {}
        for path in ("dual", "fused"):
            layer = _layer(path=path, dtype=dtype, kept=kept)
            x = torch.randn(2, 9, 12, dtype=dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = layer(x)
                y.float().square().sum().backward()
            outs[path] = (
                y.float(),
                layer.lora_A[0].grad.float(),
                layer.base_layer.weight.grad.float(),
            )
            assert layer.lora_A[0].grad.dtype == dtype
        for a, b in zip(outs["dual"], outs["fused"]):  # bf16 rounding: compare in norm
            assert (a - b).norm() <= 2e-2 * b.norm()


def test_auto_path_choice():
    cfg = dict(lora_ranks=(4,), lora_alphas=(8,))
    assert all(
        layer.uses_fused_path()
        for _, layer in molf_modules(get_molf_model(tiny_model(), MoLFConfig(**cfg)))
    )
    e = get_molf_model(tiny_model(), MoLFConfig(**cfg, train_base=False))
    assert not any(layer.uses_fused_path() for _, layer in molf_modules(e))
    d = get_molf_model(tiny_model(), MoLFConfig(**cfg, lora_dropout=0.1))
    assert not any(layer.uses_fused_path() for _, layer in molf_modules(d))
    f = get_molf_model(tiny_model(), MoLFConfig(**cfg, train_base=False, lora_grad_path="fused"))
    assert all(layer.uses_fused_path() for _, layer in molf_modules(f))


def test_kept_weight_choice_and_what_it_keeps_for_backward():
    """``auto`` keeps ``W'`` under autocast, where it takes the place of the bf16 weight
    copy FFT keeps (so it costs nothing extra), and rebuilds it on the CPU otherwise."""
    layer, x = _layer(), torch.randn(6, 12)
    assert not layer.keeps_fused_weight(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.keeps_fused_weight(x)
    layer.fused_weight = "keep"
    assert layer.keeps_fused_weight(x)

    def new_saved_bytes(module, autocast):
        """Bytes autograd keeps for backward beyond the input and the parameters."""
        known = {t.untyped_storage().data_ptr() for t in (x, *module.parameters())}
        sizes = {}  # by storage: a tensor saved by two nodes counts once

        def pack(t):
            if t.untyped_storage().data_ptr() not in known:
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                module(x)
        return sum(sizes.values())

    x.requires_grad_()
    lora = sum(p.numel() for n, p in layer.named_parameters() if "lora" in n)
    fft = nn.Linear(12, 10)
    layer.fused_weight = "keep"
    # under autocast FFT keeps bf16 x and W; MoLF bf16 x and W' (built in fp32 on the
    # CPU), plus the bf16 LoRA factors where W' is built from low-precision operands
    assert new_saved_bytes(fft, True) == 2 * (6 * 12 + 10 * 12)
    assert new_saved_bytes(layer, True) == new_saved_bytes(fft, True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(molf.layer, "_builds_in_low_precision", lambda _: True)
        assert new_saved_bytes(layer, True) == new_saved_bytes(fft, True) + 2 * lora
    # in fp32: FFT keeps nothing new, the kept path W'
    assert new_saved_bytes(fft, False) == 0
    assert new_saved_bytes(layer, False) == 4 * 10 * 12
    layer.fused_weight = "recompute"
    assert new_saved_bytes(layer, False) == 0


def test_dual_and_fused_training_trajectories_agree():
    losses = {}
    for path in ("dual", "fused"):
        model = get_molf_model(
            tiny_model("qwen2"),
            MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 8), top_k=2, lora_grad_path=path),
        )
        model.train()
        opt = MoLFAdamW(model, lr=5e-3, lora_lr=5e-3)
        losses[path] = []
        for step in range(10):
            x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(step % 2))
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[path].append(loss.item())
        losses[path + "_params"] = copy.deepcopy(model.state_dict())
    torch.testing.assert_close(
        torch.tensor(losses["fused"]), torch.tensor(losses["dual"]), rtol=1e-5, atol=1e-5
    )
    assert losses["fused"][-1] < losses["fused"][0]
    for k, v in losses["dual_params"].items():
        torch.testing.assert_close(losses["fused_params"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_generation_without_grad_matches_training_forward():
    model = get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    for _, layer in molf_modules(model):
        torch.nn.init.normal_(layer.lora_B[0])
    x = torch.randint(0, 96, (1, 6))
    with_grad = model(x).logits
    with torch.no_grad():
        without = model(x).logits
    torch.testing.assert_close(with_grad, without, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kept", ["keep", "recompute"])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_path_compiles_in_one_graph(kept, autocast):
    """``torch.compile(fullgraph=True)`` fails on any graph break in either way of the
    fused path; the compiled gradients are the eager ones."""
    torch._dynamo.reset()
    grads = []
    for compiled in (False, True):
        layer = _layer(path="fused", kept=kept)
        forward = torch.compile(layer, fullgraph=True, backend="eager") if compiled else layer
        x = torch.randn(2, 9, 12, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = forward(x)
        y.float().square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)
