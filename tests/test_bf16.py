"""bfloat16 parameters train under MoLF and MoLF-E (moments in the parameters' dtype)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from molf import MoLFAdamW, MoLFConfig, get_molf_model


@pytest.mark.parametrize("train_base", [True, False])
def test_bf16_training_learns(train_base):
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
    assert losses[-1] < 0.7 * losses[0], losses
