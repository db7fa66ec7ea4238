"""The training step (molf.train.loop): the loss from logits at target positions only
equals the model's own loss, and the loop keeps it only where it owns the loss."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from molf.tasks import Example
from molf.train.data import Batches


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_target_logits_loss_equals_the_models_loss_from_labels(tokenizer, arch):
    """Logits only where a label is read: the same loss and gradients as transformers'
    loss over every position, on a batch whose rows have targets at other positions."""
    from molf.train.loop import target_loss, target_positions

    examples = [  # long prompts of different lengths, short answers
        Example(" ".join(f"w{j}" for j in range(8 + i % 3)), f" w{i} w{i + 9}") for i in range(6)
    ]
    batches = Batches(examples, tokenizer, 64, 1, 6, 1, seed=0, rank=0, world_size=1)
    (batch,), num_targets = batches.step(0)
    positions = target_positions(batch["labels"])
    assert 0 < len(positions) < batch["labels"].shape[1] - 1  # the prompts are left out
    model = tiny_model(arch).train()
    model(**batch, num_items_in_batch=num_targets).loss.backward()
    expected_loss = model(**batch, num_items_in_batch=num_targets).loss.detach()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = target_loss(model, batch, positions, num_targets)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-6, atol=0)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "compile_", "expected"),
    [("fft", False, True), ("lora", False, True), ("adalora", False, False), ("fft", True, False)],
)
def test_target_logits_only_where_the_loop_owns_the_loss(method, compile_, expected):
    """AdaLoRA adds its regularizer to the loss the model computes from labels, and a
    compiled forward would recompile for every new number of positions."""
    from molf.train.args import TrainArgs
    from molf.train.loop import keeps_target_logits

    model = tiny_model()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    args = TrainArgs(method=method, compile=compile_)
    assert keeps_target_logits(model, args) is expected
