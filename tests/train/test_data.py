"""The batch plan (molf.train.data): every rank and micro-batch together read exactly
the global batch one process reads, with no shared data."""

from __future__ import annotations

import pytest
import torch

from molf.tasks import Example
from molf.train.data import Batches


def _examples(n: int) -> list[Example]:
    """Pairs of different lengths, so padding and token counts differ between them."""
    return [
        Example(" ".join(f"w{(i + j) % 40}" for j in range(1 + i % 5)), f" w{i % 40} w{i % 7}")
        for i in range(n)
    ]


def _rows(micro: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    """The unpadded token ids of every example in a list of micro-batches."""
    return [
        tuple(ids[mask.bool()].tolist())
        for mb in micro
        for ids, mask in zip(mb["input_ids"], mb["attention_mask"])
    ]


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (3, 2), (4, 4)])
def test_ranks_and_micro_batches_read_exactly_the_one_rank_global_batch(tokenizer, world, accum):
    examples = _examples(37)  # not a multiple of any global batch: a short last step
    per_device = 2
    one = Batches(examples, tokenizer, 32, 1, per_device * world * accum, 1, seed=5)
    ranks = [
        Batches(examples, tokenizer, 32, 1, per_device, accum, seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    assert all(b.plan == one.plan for b in ranks)
    for step in range(one.plan.steps_per_epoch + 1):  # into the second epoch
        whole, targets = one.step(step)
        parts = [b.step(step) for b in ranks]
        assert all(t == targets for _, t in parts)  # every rank divides by the global count
        assert sorted(r for micro, _ in parts for r in _rows(micro)) == sorted(_rows(whole))
        assert all(len(micro) <= accum for micro, _ in parts)
