"""``--eval-steps N``: the evaluation loss on the evaluated rows every N optimizer steps,
the task's metrics too with ``--eval-metrics``, and ``--early-stopping-patience``.

The loss is the training loss's, on the task's evaluation records as training pairs
(``TaskData.eval_examples``): the sum of the completion tokens' cross-entropy over all
pairs divided by their number of tokens. Every rank computes it on its slice of the
pairs (FSDP2 needs every rank in each forward) and the sums are all-reduced, so all
ranks read the same loss and stop at the same step. The metrics are computed on rank 0
with the whole model (not under FSDP2, which shards it). The loop calls nothing here
when ``--eval-steps`` is 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from molf.tasks import Example, TaskData
from molf.tasks.encoding import IGNORE_INDEX, collate, encode_example, ensure_pad_token
from molf.tasks.scoring import inference
from molf.train.args import TrainArgs
from molf.train.distributed import DistContext, all_reduce_sum, barrier, unwrap
from molf.train.evaluation import evaluate


@dataclass
class EarlyStopping:
    """The best eval loss so far and the evaluations since; ``stopped_at`` is the step
    at which ``patience`` evaluations in a row did not improve on it (None: never)."""

    patience: int
    best_eval_loss: float = math.inf
    best_step: int = 0
    evaluations_without_improvement: int = 0
    stopped_at: int | None = None

    def add(self, step: int, loss: float, last: bool = False) -> bool:
        """Count an evaluation; True when the run should stop after ``step`` (never
        said of the ``last`` step: the run ends there anyway)."""
        if loss < self.best_eval_loss:
            self.best_eval_loss, self.best_step = loss, step
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        if self.patience and self.evaluations_without_improvement >= self.patience and not last:
            self.stopped_at = step
        return self.stopped_at is not None

    def record(self) -> dict[str, Any]:
        """eval.json's ``early_stopping`` entry (and the checkpoint's state)."""
        return asdict(self)

    def message(self) -> str:
        return (
            f"early stopping at step {self.stopped_at}: the eval loss has not improved for "
            f"{self.patience} evaluation(s) (best {self.best_eval_loss:.4f} at step "
            f"{self.best_step}); the model saved is the one of step {self.stopped_at}"
        )


class StepEvaluator:
    """The evaluation of one ``--eval-steps`` step: :meth:`loss` on every rank, the
    task's metrics (``metrics``, called on rank 0 with the whole model) and the early
    stopping rule."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer: Any,
        max_length: int,
        pad_id: int,
        batch_size: int,
        dist: DistContext,
        metrics: Callable[[nn.Module], dict[str, float]] | None = None,
        patience: int = 0,
    ) -> None:
        self.dist, self.pad_id, self.batch_size = dist, pad_id, batch_size
        self.metrics = metrics
        self.early = EarlyStopping(patience)
        encoded = [encode_example(tokenizer, e.prompt, e.completion, max_length) for e in examples]
        mine = encoded[dist.rank :: dist.world_size]
        per_rank = math.ceil(len(encoded) / dist.world_size)
        if encoded and len(mine) < per_rank:  # same number of forwards on every rank
            mine.append({**encoded[0], "labels": [IGNORE_INDEX] * len(encoded[0]["labels"])})
        self.items = sorted(mine, key=lambda item: len(item["input_ids"]))  # less padding

    def loss(self, model: nn.Module, autocast: Any) -> float:
        """The loss of ``model`` on every rank's pairs (all-reduced; every rank calls it)."""
        device = next(model.parameters()).device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, tokens
        with inference(model), autocast:
            for start in range(0, len(self.items), self.batch_size):
                batch = collate(self.items[start : start + self.batch_size], self.pad_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                totals += summed_loss(model, batch)
        loss_sum, tokens = all_reduce_sum(totals, self.dist).tolist()
        return loss_sum / tokens if tokens else math.nan

    def __call__(
        self, model: nn.Module, step: int, autocast: Any, last: bool = False
    ) -> tuple[dict[str, float], bool]:
        """(``eval_loss`` and the ``eval_<metric>`` values for rank 0's log, whether to
        stop after ``step``; ``last``: the run's last step)."""
        record = {"eval_loss": self.loss(model, autocast)}
        if self.metrics is not None:
            if self.dist.is_main:
                metrics = self.metrics(unwrap(model))
                record.update({f"eval_{k}": float(v) for k, v in metrics.items()})
            barrier(self.dist)
        return record, self.early.add(step, record["eval_loss"], last)


def summed_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(sum of the target tokens' cross-entropy, their number) of one padded batch, as
    float64 on the batch's device; the logits are computed only where labels are read
    when the model's forward takes ``logits_to_keep``."""
    labels = batch["labels"][:, 1:]
    kwargs = {}
    if _takes_logits_to_keep(model):
        positions = (labels != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        labels = labels[:, positions]
        kwargs["logits_to_keep"] = positions
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
    ).logits.float()
    if not kwargs:
        logits = logits[:, :-1]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (labels != IGNORE_INDEX).sum()
    return torch.stack([loss.double(), count.double()])


def _takes_logits_to_keep(model: nn.Module) -> bool:
    inner = unwrap(model)
    get_base = getattr(inner, "get_base_model", None)  # PEFT
    inner = get_base() if callable(get_base) else inner
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def step_evaluator(
    args: TrainArgs,
    task: Any,
    data: TaskData,
    tokenizer: Any,
    max_length: int,
    dist: DistContext,
    state: dict[str, Any] | None = None,
) -> StepEvaluator | None:
    """The run's :class:`StepEvaluator` (None without ``--eval-steps``), its early
    stopping restored from a checkpoint's ``state`` (:meth:`EarlyStopping.record`)."""
    if not args.eval_steps:
        return None

    def metrics(model: nn.Module) -> dict[str, float]:
        return evaluate(task, model, tokenizer, data.eval, args, None, "step")

    evaluator = StepEvaluator(
        data.eval_examples,
        tokenizer,
        max_length,
        ensure_pad_token(tokenizer),
        args.eval_batch_size,
        dist,
        metrics if args.eval_metrics else None,
        args.early_stopping_patience,
    )
    if state:  # the run's own patience: a resume may change it
        evaluator.early = EarlyStopping(**{**state, "patience": args.early_stopping_patience})
    return evaluator
