"""The user's own data: JSON lines of ``{"prompt": ..., "completion": ...}``.

A file is both the training and the evaluation set (did the model learn these
pairs?); a directory holds ``train.jsonl`` and ``eval.jsonl`` for a held-out check.

Splits (``split`` of :meth:`JsonlTask.load`): a directory's "test" pairs are
``eval.jsonl`` and its "val" pairs ``val.jsonl`` (optional; asking for "val" without
it is an error); both train on ``train.jsonl``. A single file is train, val and test
alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import Example, TaskData
from molf.tasks.metrics import mean, text_exact_match, text_matches
from molf.tasks.scoring import completion_logprobs, generate
from molf.tasks.sources import (
    Origin,
    check_split,
    existing_path,
    limited_task_data,
    parse_rows,
    read_rows,
    text,
)

TRAIN_FILE, EVAL_FILE = "train.jsonl", "eval.jsonl"  # read when --data is a directory
VAL_FILE = "val.jsonl"  # a directory's optional pairs for --eval-split val


def parse_pair_row(row: dict[str, Any], origin: Origin) -> Example:
    """An Example from a row; both fields must be non-empty strings, used as written."""
    return Example(text(row, "prompt", origin), text(row, "completion", origin))


def jsonl_files(data: str | None, split: str = "test") -> tuple[Path, Path]:
    """(train file, ``split`` eval file) for ``--data``: the same file twice, or a
    directory's train.jsonl and its eval.jsonl ("test") or val.jsonl ("val")."""
    if data is None:
        raise MolfError(
            "the jsonl task has no hub dataset; pass --data FILE.jsonl or a "
            f"directory with {TRAIN_FILE} and {EVAL_FILE}"
        )
    path = existing_path(data)
    if not path.is_dir():
        return path, path
    missing = [n for n in (TRAIN_FILE, EVAL_FILE) if not (path / n).is_file()]
    if missing:
        raise MolfError(
            f"--data {path}: missing {', '.join(missing)}; a directory needs "
            f"{TRAIN_FILE} and {EVAL_FILE}"
        )
    if split == "val" and not (path / VAL_FILE).is_file():
        raise MolfError(
            f"--data {path}: missing {VAL_FILE}, which --eval-split val evaluates on; "
            f"add it (pairs disjoint from {EVAL_FILE}) or use --eval-split test"
        )
    return path / TRAIN_FILE, path / (VAL_FILE if split == "val" else EVAL_FILE)


def read_pairs(path: Path) -> list[Example]:
    return parse_rows(read_rows(path), parse_pair_row, skip_bad=False)[0]


class JsonlTask:
    """Prompt/completion pairs from the user; results lead with exact match."""

    name = "jsonl"
    primary_metric = "exact_match"
    max_new_tokens = 64

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",
    ) -> TaskData:
        """Pairs from a file (train = eval) or a directory (train.jsonl, and eval.jsonl
        for the "test" split or val.jsonl for "val")."""
        train_path, eval_path = jsonl_files(data, check_split(split))
        train = read_pairs(train_path)
        evals = train if eval_path == train_path else read_pairs(eval_path)
        return limited_task_data(
            train,
            evals,
            str(data),
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            seed=seed,
            what="pairs",
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[Example],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        predictions: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """How well the model reproduces each completion.

        - exact_match: share of greedy generations equal to the completion, both stripped;
        - mean_logprob: mean over pairs of the completion's mean token log-prob (<= 0).

        ``predictions`` gets per pair: prompt, reference (the completion), output (the
        generation), logprob (the completion's mean token log-prob) and correct (exact match).
        """
        prompts = [r.prompt for r in records]
        references = [r.completion for r in records]
        generated = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        scores = completion_logprobs(model, tokenizer, prompts, references, batch_size)
        if predictions is not None:
            for prompt, reference, output, score in zip(
                prompts, references, generated, scores, strict=True
            ):
                predictions.append(
                    {
                        "prompt": prompt,
                        "reference": reference,
                        "output": output,
                        "logprob": score,
                        "correct": text_matches(output, reference),
                    }
                )
        return {
            "exact_match": text_exact_match(generated, references),
            "mean_logprob": mean(scores),
        }

    def baselines(self, records: list[Example]) -> dict[str, float]:
        """No model-free baseline for free text: {}."""
        return {}
