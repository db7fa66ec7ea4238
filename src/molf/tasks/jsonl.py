"""The user's own data: prompt/completion pairs or chat conversations.

Rows, in any of three shapes:

- ``{"prompt": "...", "completion": "..."}``: text;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation ending with
  an assistant message, which is the completion (the loss is taken on it alone; the
  earlier turns are its prompt, rendered with the model's chat template);
- ``{"prompt": [messages], "completion": [one assistant message]}`` (TRL's
  conversational prompt-completion form).

Where they come from (``--data``):

- a file: JSON lines or a JSON list (errors name the line), or any other file
  ``datasets`` reads (``.csv``, ``.tsv``, ``.parquet``, ``.arrow``). A file is both
  the training and the evaluation set (did the model learn these pairs?);
- a directory with ``train.jsonl`` and ``eval.jsonl`` (and optionally ``val.jsonl``
  for ``--eval-split val``) for a held-out check;
- a hub dataset id (``owner/name``) or a directory in a hub dataset's layout (e.g.
  ``train.parquet``, ``test.parquet``), read with ``datasets.load_dataset``: it trains
  on the ``train`` split and evaluates on ``test`` (``validation`` for
  ``--eval-split val``), or on ``train`` when it has no such split.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import DataPath, Example, TaskData
from molf.tasks.metrics import mean, text_exact_match, text_matches
from molf.tasks.scoring import completion_logprobs, generate
from molf.tasks.sources import (
    Origin,
    check_split,
    dataset_splits,
    existing_path,
    file_rows,
    limited_task_data,
    parse_rows,
    text,
)

TRAIN_FILE, EVAL_FILE = "train.jsonl", "eval.jsonl"  # read when --data is a directory
VAL_FILE = "val.jsonl"  # a directory's optional pairs for --eval-split val


def parse_pair_row(row: dict[str, Any], origin: Origin) -> Example:
    """An Example from a row of any of the module's three shapes; text is used as
    written."""
    if "messages" in row:
        messages = _messages(row, "messages", origin)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise origin.error(
                "messages", "must end with an assistant message, after at least one other"
            )
        return Example(messages[:-1], messages[-1]["content"])
    if isinstance(row.get("prompt"), list):
        reply = _messages(row, "completion", origin)
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise origin.error("completion", "must be a list of one assistant message")
        return Example(_messages(row, "prompt", origin), reply[0]["content"])
    return Example(text(row, "prompt", origin), text(row, "completion", origin))


def _messages(row: dict[str, Any], name: str, origin: Origin) -> tuple[dict[str, str], ...]:
    """A non-empty list of ``{"role", "content"}`` messages with string values."""
    value = row.get(name)
    if not isinstance(value, list) or not value:
        raise origin.error(name, f"must be a non-empty list of messages, got {value!r}")
    for message in value:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise origin.error(
                name, f'every message needs string "role" and "content", got {message!r}'
            )
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def jsonl_files(data: str | None, split: str = "test") -> tuple[Path, Path]:
    """(train file, ``split`` eval file) for ``--data``: the same file twice, or a
    directory's train.jsonl and its eval.jsonl ("test") or val.jsonl ("val")."""
    if data is None:
        raise MolfError(
            "the jsonl task has no default dataset; pass --data with a file, a directory "
            f"with {TRAIN_FILE} and {EVAL_FILE}, or a hub dataset id"
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
    return parse_rows(file_rows(path), parse_pair_row, skip_bad=False)[0]


def _is_dataset(data: str | None) -> bool:
    """A hub dataset id, or a directory in a hub dataset's layout (no train.jsonl)."""
    if data is None:
        return False
    path = Path(data).expanduser()
    if path.exists():
        return path.is_dir() and not (path / TRAIN_FILE).exists()
    return re.fullmatch(r"[\w.-]+/[\w.-]+", data) is not None


def dataset_pairs(data: str, split: str) -> tuple[list[Example], list[Example], str]:
    """(train, eval, source) from a hub dataset or a directory in its layout."""
    wanted = {"test": ("test",), "val": ("validation", "val")}[split]
    splits = dataset_splits(data)
    if "train" not in splits:
        raise MolfError(f"--data {data}: no train split (found {', '.join(splits)})")
    held_out = next((name for name in wanted if name in splits), "train")
    train = parse_rows(splits["train"], parse_pair_row, skip_bad=False)[0]
    evals = train
    if held_out != "train":
        evals = parse_rows(splits[held_out], parse_pair_row, skip_bad=False)[0]
    return train, evals, f"{data} (train: train, eval: {held_out})"


class JsonlTask:
    """Prompt/completion pairs from the user; results lead with exact match."""

    name = "jsonl"
    primary_metric = "exact_match"
    max_new_tokens = 64

    def data_path(self, data: str) -> DataPath:
        """The file or directory ``data`` names; none for a hub dataset id."""
        path = Path(data).expanduser()
        return DataPath(None if not path.exists() and _is_dataset(data) else path)

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",
    ) -> TaskData:
        """Pairs from a file (train = eval), a directory (train.jsonl, and eval.jsonl
        for the "test" split or val.jsonl for "val"), or a hub dataset (see the module)."""
        check_split(split)
        if _is_dataset(data):
            train, evals, source = dataset_pairs(str(data), split)
        else:
            train_path, eval_path = jsonl_files(data, split)
            train = read_pairs(train_path)
            evals = train if eval_path == train_path else read_pairs(eval_path)
            source = str(data)
        return limited_task_data(
            train,
            evals,
            source,
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
