"""A task's evaluation of a model, for ``molf train`` and ``molf eval``: load the task's
data, score the records, keep each example's output in ``predictions.jsonl`` (one line
per example, tagged with its stage: "before" or "after" training)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from molf.atomic import write_text_atomic
from molf.errors import MolfError
from molf.ownership import claim
from molf.tasks import TaskData, get_task
from molf.train.args import TrainArgs
from molf.train.logs import parse_record


def load_task(args: TrainArgs) -> tuple[Any, TaskData]:
    """The task named by ``--task`` and its data: the training examples and the
    ``--eval-split`` records, capped by the sample limits (a MolfError when
    ``--eval-steps`` asks for evaluation pairs the task does not give)."""
    task = get_task(args.task)
    data = task.load(
        args.data,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
        split=args.eval_split,
        **{name: getattr(args, name) for name in task.settings},
    )
    if args.eval_steps and not data.eval_examples:
        raise MolfError(f"--eval-steps: the task {args.task} gives no evaluation pairs")
    return task, data


def evaluate(
    task, model, tokenizer, records, args: TrainArgs, out_dir: Path | None, stage: str
) -> dict[str, float]:
    """The task's metrics on ``records``; each example's output goes to
    ``out_dir/predictions.jsonl`` (when given) as one line tagged with ``stage``."""
    predictions: list[dict[str, Any]] = []
    metrics = task.evaluate(
        model,
        tokenizer,
        records,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens or task.max_new_tokens,
        predictions=predictions,
    )
    if out_dir is not None:
        write_predictions(out_dir / "predictions.jsonl", stage, predictions)
    return metrics


def write_predictions(path: Path, stage: str, rows: list[dict[str, Any]]) -> None:
    """Replace the ``stage`` lines of a predictions file, keeping the other stages' lines
    (a file molf did not write is refused before it is read)."""
    claim(path)
    lines = _other_stages(path, stage) + [json.dumps({"stage": stage, **row}) for row in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _other_stages(path: Path, stage: str) -> list[str]:
    """The lines of the predictions file ``path`` (if any) of stages other than ``stage``;
    a line that is not a JSON object is a MolfError naming ``path:line``."""
    if not path.exists():
        return []
    kept = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = parse_record(raw)
        except ValueError as e:
            raise MolfError(
                f"{path}:{number}: {e}; molf writes one JSON object per line there: "
                "restore that line, or move the file away (its other stages' lines are "
                "then not kept)"
            ) from None
        if record.get("stage") != stage:
            kept.append(raw.decode("utf-8"))
    return kept
