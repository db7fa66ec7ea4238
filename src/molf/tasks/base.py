"""The types every task shares: a training pair, a loaded dataset, what ``--data`` names,
the task protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

Prompt = str | tuple[dict[str, str], ...]  # text, or chat messages before the reply
NO_PROMPT = ""  # a text row's prompt: its completion is plain text, the loss on every token


@dataclass(frozen=True)
class Example:
    """One training pair. The loss is taken on the completion tokens only.

    ``prompt`` is text, or a conversation (``[{"role": ..., "content": ...}, ...]``,
    rendered with the model's chat template) whose reply is ``completion``, or
    :data:`NO_PROMPT` for a text row: ``completion`` is then plain text, never wrapped in
    a chat template, with the loss on every token."""

    prompt: Prompt
    completion: str  # e.g. " English": a leading space where the text continues naturally


@dataclass
class TaskData:
    """What ``Task.load`` returns: training pairs, evaluation records, their origin and
    which records are evaluated (for eval.json and the model card); and the evaluation
    records as training pairs (``eval_examples``: what ``--eval-steps`` takes the loss
    of, e.g. a question and its answer, an edit's prompt and its new answer)."""

    train: list[Example]
    eval: list[Any]  # task-specific records, consumed by the same task's ``evaluate``
    source: str  # human-readable: the path or hub id the data came from
    evaluated: str = ""  # e.g. "the test half of the held-out 10% of x.jsonl: 6 pairs"
    eval_examples: list[Example] = field(default_factory=list)  # one per ``eval`` record

    def __post_init__(self) -> None:
        if not self.evaluated:
            self.evaluated = f"{len(self.eval)} evaluation records of {self.source}"


@dataclass(frozen=True)
class DataPath:
    """What a ``--data`` value names, as its task reads it (``Task.data_path``)."""

    path: Path | None  # the file or directory read; None: a name (built-in data, a hub id)
    mode: str | None = None  # how the value asks the task to split it (Spider's ``#MODE``)


class Task(Protocol):
    """An evaluation task: loads its data and scores a model on it."""

    name: str
    primary_metric: str  # the key of evaluate()'s dict that results tables lead with
    max_new_tokens: int  # default generation length for this task's generation metrics
    settings: tuple[str, ...]  # TrainArgs fields only this task reads: load()'s keywords

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",  # "val" or "test": which held-out records to evaluate on
        **settings: Any,  # the values of the fields named by ``settings``
    ) -> TaskData: ...

    def data_path(self, data: str) -> DataPath:
        """The local file or directory that ``load(data)`` reads (existing or not), and
        the split mode ``data`` carries; MolfError for a value the task cannot read."""
        ...

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[Any],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        predictions: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Metrics over ``records``. When ``predictions`` is a list, one dict per evaluated
        example (or contest) is appended to it: ``prompt``, ``reference``, ``output`` (tasks
        that generate), ``scores`` (tasks that score choices) and ``correct``, whose mean
        is the primary metric (over the lines of that metric, where lines name a ``metric``)."""
        ...

    def baselines(self, records: list[Any]) -> dict[str, float]:
        """Scores that need no model on ``records`` (e.g. chance, majority answer), the
        lines a trained model must beat; {} when the task has none."""
        ...
