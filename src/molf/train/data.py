"""Training batches in a fixed, seeded order that any step can be recomputed from.

Epoch ``e`` visits the examples in ``randperm(n, seed + e)`` order. Optimizer step
``s`` consumes the next ``global_batch = batch_size * world_size * grad_accum``
examples of that order, so resuming at step ``s`` needs no saved sampler state, and
a run on N processes reads the same global batches as one process would. A step never
crosses an epoch boundary: the last step of an epoch may be smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from molf.tasks import Example
from molf.tasks.encoding import IGNORE_INDEX, collate, encode_example

PROGRESS_FROM = 1000  # tokenising more examples than this shows a progress bar (on a TTY)


@dataclass
class BatchPlan:
    num_examples: int
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_examples / self.global_batch)

    def total_steps(self, max_steps: int | None, epochs: float) -> int:
        if max_steps is not None:
            return max_steps
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def indices(self, step: int) -> list[int]:
        """The example indices of optimizer step ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(
            self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        start = within * self.global_batch
        return order[start : start + self.global_batch].tolist()


class Batches:
    """Tokenised examples and the micro-batches of each step for one rank.

    Tokenising more than ``PROGRESS_FROM`` examples shows a progress bar on rank 0
    when stderr is a terminal.
    """

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        max_length: int,
        pad_id: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        quiet = len(examples) <= PROGRESS_FROM or rank != 0
        self.encoded = [
            encode_example(tokenizer, e.prompt, e.completion, max_length)
            for e in tqdm(examples, desc="tokenising", unit="ex", disable=True if quiet else None)
        ]
        self.pad_id = pad_id
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.rank, self.world_size = rank, world_size
        self.plan = BatchPlan(len(examples), batch_size * world_size * grad_accum, seed)

    def step(self, step: int) -> tuple[list[dict[str, torch.Tensor]], int]:
        """This rank's micro-batches for ``step`` and the global count of target tokens
        (the loss is a sum over tokens divided by it, so any split gives the same grads)."""
        idx = self.plan.indices(step)
        items = [self.encoded[i] for i in idx]
        targets = sum(sum(t != IGNORE_INDEX for t in it["labels"][1:]) for it in items)
        # Rank r takes a contiguous slice, then splits it into grad_accum micro-batches.
        per_rank = math.ceil(len(items) / self.world_size)
        mine = items[self.rank * per_rank : (self.rank + 1) * per_rank]
        per_micro = math.ceil(len(mine) / self.grad_accum) if mine else 0
        micro = (
            [collate(mine[i : i + per_micro], self.pad_id) for i in range(0, len(mine), per_micro)]
            if mine
            else []
        )
        return micro, targets
