"""MoLFLinear's public API (state_keys, merged_weight, stacked_lora), each checked against
a slow, obvious re-implementation of its maths or names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from molf import MoLFLinear
from molf.layer import StateKeys

SCALINGS = {(3, 5): (2.0, 0.5), (4,): (1.5,)}


def _layer(ranks=(3, 5), bias=True, dtype=torch.float32) -> MoLFLinear:
    torch.manual_seed(0)
    layer = MoLFLinear(nn.Linear(12, 10, bias=bias, dtype=dtype), ranks, SCALINGS[ranks])
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def _slow_merge(w, lora_a, lora_b, scalings) -> torch.Tensor:
    """``W + sum_i s_i B_i A_i``, one expert at a time, in float64."""
    merged = w.double()
    for a, b, s in zip(lora_a, lora_b, scalings):
        merged = merged + s * (b.double() @ a.double())
    return merged


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ranks", [(3, 5), (4,)])
def test_state_keys_name_the_layer_tensors_in_state_dict_order(bias, ranks):
    layer = _layer(ranks, bias)
    keys = layer.state_keys("model.q_proj.")
    n = len(ranks)
    assert keys == StateKeys(
        weight="model.q_proj.base_layer.weight",
        bias="model.q_proj.base_layer.bias" if bias else None,
        lora_a=tuple(f"model.q_proj.lora_A.{i}" for i in range(n)),
        lora_b=tuple(f"model.q_proj.lora_B.{i}" for i in range(n)),
    )
    assert keys.all() == list(layer.state_dict(prefix="model.q_proj."))
    assert layer.state_keys().all() == list(layer.state_dict())


@pytest.mark.parametrize("ranks", [(3, 5), (4,)])
def test_merged_weight_is_w_plus_each_scaled_expert(ranks):
    layer = _layer(ranks)
    w_before = layer.base_layer.weight.detach().clone()
    merged = layer.merged_weight()
    slow = _slow_merge(w_before, layer.lora_A, layer.lora_B, layer.scalings)
    torch.testing.assert_close(merged.double(), slow, rtol=1e-6, atol=1e-6)
    assert merged.dtype == torch.float32 and not merged.requires_grad
    assert torch.equal(layer.base_layer.weight, w_before)  # W itself is not written


def test_merged_weight_is_computed_in_fp32_and_cast_back():
    layer = _layer(dtype=torch.bfloat16)
    merged = layer.merged_weight()
    slow = _slow_merge(layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scalings)
    assert merged.dtype == torch.bfloat16
    # fp32 sums differ from float64's by far less than a bf16 step: at most one rounding
    torch.testing.assert_close(merged, slow.to(torch.bfloat16), rtol=2**-7, atol=0)


def test_merged_weight_from_a_state_dict_reads_the_named_tensors():
    layer = _layer()
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in layer.state_dict(prefix="m.").items()}
    own = layer.merged_weight()
    merged = layer.merged_weight(state, "m.")
    keys = layer.state_keys("m.")
    slow = _slow_merge(
        state[keys.weight],
        [state[k] for k in keys.lora_a],
        [state[k] for k in keys.lora_b],
        layer.scalings,
    )
    torch.testing.assert_close(merged.double(), slow, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight(), own, rtol=0, atol=0)


def test_layer_output_is_the_merged_linear():
    layer = _layer()
    x = torch.randn(4, 12)
    expected = nn.functional.linear(x, layer.merged_weight(), layer.bias)
    for path, kept in (("dual", "auto"), ("fused", "keep"), ("fused", "recompute")):
        layer.grad_path, layer.fused_weight = path, kept
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranks", [(3, 5), (4,)])
def test_stacked_lora_concatenates_a_and_scaled_b(ranks):
    layer = _layer(ranks)
    a, b = layer.stacked_lora()
    assert a.shape == (sum(ranks), 12) and b.shape == (10, sum(ranks))
    row = 0
    for i, (r, s) in enumerate(zip(ranks, layer.scalings)):
        assert torch.equal(a[row : row + r], layer.lora_A[i])
        assert torch.equal(b[:, row : row + r], layer.lora_B[i] * s)
        row += r
    assert a.is_contiguous() and b.is_contiguous()
    assert not a.requires_grad and not b.requires_grad
    w = layer.base_layer.weight
    slow = _slow_merge(w, layer.lora_A, layer.lora_B, layer.scalings) - w.double()
    torch.testing.assert_close((b @ a).double(), slow, rtol=1e-6, atol=1e-6)
