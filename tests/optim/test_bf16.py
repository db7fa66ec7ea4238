"""bfloat16 parameters train under MoLF and MoLF-E (moments in the parameters' dtype);
float16 ones are refused."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from molf import MoLFAdamW, MoLFConfig, get_molf_model


# MoLF-E trains only its LoRA experts (embeddings, norms and lm_head frozen by default):
# on random tokens 25 steps lower its loss by about 9%, MoLF's by over 30%.
@pytest.mark.parametrize(("train_base", "ratio"), [(True, 0.7), (False, 0.93)])
def test_bf16_training_learns(train_base, ratio):
    model = tiny_model().to(torch.bfloat16)
    model = get_molf_model(
        model, MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 8), train_base=train_base)
    )
    model.train()
    opt = MoLFAdamW(model, lr=1e-2, lora_lr=1e-2)
    x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(25):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < ratio * losses[0], losses


def test_float16_parameters_are_refused():
    """float16 moments underflow (NaN after one step): a clear error instead, at
    construction, or at the first step for a model cast to float16 after it."""
    from molf import MolfError

    cfg = MoLFConfig(lora_ranks=(4,), lora_alphas=(8,))
    half = get_molf_model(tiny_model().to(torch.float16), cfg)
    with pytest.raises(MolfError, match="float16 parameters are not supported: use bf16"):
        MoLFAdamW(half, lr=1e-2)

    model = get_molf_model(tiny_model(), cfg)
    opt = MoLFAdamW(model, lr=1e-2)
    model.half()
    x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(x, labels=x).loss.backward()
    with pytest.raises(MolfError, match="float16 parameters are not supported"):
        opt.step()

    amp = get_molf_model(tiny_model(), cfg)  # fp32 weights under fp16 autocast: fine
    opt = MoLFAdamW(amp, lr=1e-2)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = amp(x, labels=x).loss
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in amp.parameters())
