"""The user's own data: prompt/completion pairs, conversations, instructions or text.

Rows: any layout of :mod:`molf.tasks.layouts` (prompt/completion, messages, sharegpt,
alpaca, text), its keys renamed by :class:`~molf.tasks.layouts.Fields`.

Where they come from (``--data``):

- a file: JSON lines or a JSON list (errors name the line), or any other file
  ``datasets`` reads (``.csv``, ``.tsv``, ``.parquet``, ``.arrow``). It is cut by a
  hash of each row's prompt, ``h = hash_fraction(prompt)`` (sha256 of the fixed
  ``SPLIT_SALT`` and the normalised prompt, see :mod:`molf.tasks.sources`): a row is
  held out when ``h < val_size`` (``--val-size``, default 0.1), and the held-out rows
  are val when ``h < val_size / 2`` and test otherwise; the rest are trained on. Both
  splits train on the same rows; the split does not move with ``--seed``, file order
  or caps, and rows with the same prompt fall on one side;
- a directory with ``train.jsonl`` and ``eval.jsonl`` (and optionally ``val.jsonl``
  for ``--eval-split val``): the user's own held-out files;
- a hub dataset id (``owner/name``) or a directory in a hub dataset's layout (e.g.
  ``train.parquet``, ``test.parquet``), read with ``datasets.load_dataset``: it trains
  on the ``train`` split and evaluates on ``test`` (``validation`` for
  ``--eval-split val``); without such a split its ``train`` split is cut like a file.

``--eval-on-train`` (a smoke test) trains on every row and evaluates on the same rows,
with a warning. ``TaskData.evaluated`` says which rows were evaluated.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import NO_PROMPT, DataPath, Example, TaskData
from molf.tasks.layouts import Fields, parse_pair_row
from molf.tasks.metrics import mean, text_exact_match, text_matches
from molf.tasks.scoring import completion_logprobs, generate
from molf.tasks.sources import (
    Row,
    check_split,
    dataset_splits,
    existing_path,
    file_rows,
    hash_part,
    limited_task_data,
    parse_rows,
)

TRAIN_FILE, EVAL_FILE = "train.jsonl", "eval.jsonl"  # read when --data is a directory
VAL_FILE = "val.jsonl"  # a directory's optional pairs for --eval-split val
VAL_SIZE = 0.1  # a file's share held out for evaluation (LLaMA-Factory's val_size)
ON_TRAIN = "the training rows (--eval-on-train)"
ON_TRAIN_WARNING = (
    "--eval-on-train: evaluating on the training rows, so the metrics say how well the "
    "model fits them, not how it does on rows it has not seen; drop the flag to evaluate "
    "on held-out rows (--val-size of a file)"
)


@dataclass(frozen=True)
class JsonlOptions:
    """How the task reads and splits the rows: ``--val-size``, ``--eval-on-train`` and
    the column mapping (``--prompt-field``, ``--completion-field``, ``--messages-field``)."""

    val_size: float = VAL_SIZE
    eval_on_train: bool = False
    fields: Fields = field(default_factory=Fields)

    def __post_init__(self) -> None:
        if not 0 < self.val_size < 1:
            raise MolfError(f"--val-size must be in (0, 1), got {self.val_size}")


@dataclass(frozen=True)
class Pairs:
    """Training and evaluation pairs, and which rows the evaluation pairs are."""

    train: list[Example]
    evals: list[Example]
    evaluated: str


def prompt_key(example: Example) -> str:
    """What the held-out split hashes: the prompt's text, a conversation's messages as
    JSON, a text row's text."""
    if example.prompt == NO_PROMPT:
        return example.completion
    if isinstance(example.prompt, str):
        return example.prompt
    return json.dumps(list(example.prompt), sort_keys=True)


def held_out(pairs: list[Example], split: str, val_size: float, name: str) -> Pairs:
    """``pairs`` cut by prompt hash (see the module): train ``h >= val_size``, val
    ``h < val_size / 2``, test ``val_size / 2 <= h < val_size``."""
    low, high = (0.0, val_size / 2) if split == "val" else (val_size / 2, val_size)
    evals = hash_part(pairs, prompt_key, low, high)
    if pairs and not evals:  # no pairs at all: limited_task_data says so
        raise MolfError(
            f"--data {name}: --val-size {val_size:g} holds out no {split} rows of its "
            f"{len(pairs)} ({split} takes half of the held-out share, by prompt hash); "
            f"raise --val-size, pass a directory with {TRAIN_FILE} and {EVAL_FILE}, or "
            "--eval-on-train for a smoke test"
        )
    share = f"{val_size * 100:g}%"
    return Pairs(
        hash_part(pairs, prompt_key, val_size, 1.0),
        evals,
        f"the {split} half of the held-out {share} of {name} (by prompt hash)",
    )


def split_or_all(pairs: list[Example], split: str, options: JsonlOptions, name: str) -> Pairs:
    """One set of rows: cut by :func:`held_out`, or every row twice (--eval-on-train)."""
    if options.eval_on_train:
        return Pairs(pairs, pairs, ON_TRAIN)
    return held_out(pairs, split, options.val_size, name)


def jsonl_files(data: str | None, split: str = "test") -> tuple[Path, Path | None]:
    """(train file, ``split`` eval file) for ``--data``: a file and None (it is cut by
    hash), or a directory's train.jsonl and its eval.jsonl ("test") or val.jsonl ("val")."""
    if data is None:
        raise MolfError(
            "the jsonl task has no default dataset; pass --data with a file, a directory "
            f"with {TRAIN_FILE} and {EVAL_FILE}, or a hub dataset id"
        )
    path = existing_path(data)
    if not path.is_dir():
        return path, None
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


def read_pairs(rows: list[Row], fields: Fields) -> list[Example]:
    """The pairs of ``rows``; a malformed row is a DataError naming file, line and field."""
    return parse_rows(rows, partial(parse_pair_row, fields=fields), skip_bad=False)[0]


def file_pairs(data: str | None, split: str, options: JsonlOptions) -> Pairs:
    """A file cut by prompt hash, or a directory's train and eval files."""
    train_path, eval_path = jsonl_files(data, split)
    train = read_pairs(file_rows(train_path), options.fields)
    if eval_path is None:
        return split_or_all(train, split, options, str(train_path))
    if options.eval_on_train:
        return Pairs(train, train, ON_TRAIN)
    return Pairs(
        train, read_pairs(file_rows(eval_path), options.fields), f"the rows of {eval_path}"
    )


def _is_dataset(data: str | None) -> bool:
    """A hub dataset id, or a directory in a hub dataset's layout (no train.jsonl)."""
    if data is None:
        return False
    path = Path(data).expanduser()
    if path.exists():
        return path.is_dir() and not (path / TRAIN_FILE).exists()
    return re.fullmatch(r"[\w.-]+/[\w.-]+", data) is not None


def dataset_pairs(data: str, split: str, options: JsonlOptions) -> tuple[Pairs, str]:
    """(pairs, source) from a hub dataset or a directory in its layout: its train split,
    and its test (validation) split or else its train split cut by prompt hash."""
    wanted = {"test": ("test",), "val": ("validation", "val")}[split]
    splits = dataset_splits(data)
    if "train" not in splits:
        raise MolfError(f"--data {data}: no train split (found {', '.join(splits)})")
    train = read_pairs(splits["train"], options.fields)
    name = next((name for name in wanted if name in splits), None)
    if name is None:
        pairs = split_or_all(train, split, options, f"{data}[train]")
        return pairs, f"{data} (train: train, cut by prompt hash)"
    evals = train if options.eval_on_train else read_pairs(splits[name], options.fields)
    evaluated = ON_TRAIN if options.eval_on_train else f"the {name} split of {data}"
    return Pairs(train, evals, evaluated), f"{data} (train: train, eval: {name})"


class JsonlTask:
    """The user's own pairs (see the module); results lead with exact match."""

    name = "jsonl"
    primary_metric = "exact_match"
    max_new_tokens = 64
    settings = ("val_size", "eval_on_train", "prompt_field", "completion_field", "messages_field")

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
        val_size: float = VAL_SIZE,
        eval_on_train: bool = False,
        prompt_field: str | None = None,
        completion_field: str | None = None,
        messages_field: str | None = None,
    ) -> TaskData:
        """Pairs from a file (cut by prompt hash), a directory (train.jsonl, and
        eval.jsonl for the "test" split or val.jsonl for "val"), or a hub dataset (see
        the module). The keywords after ``split`` are the task's :attr:`settings`
        (``--val-size``, ``--eval-on-train``, ``--prompt-field``, ...)."""
        check_split(split)
        named = {"prompt": prompt_field, "completion": completion_field}
        fields = Fields(**{k: v for k, v in {**named, "messages": messages_field}.items() if v})
        options = JsonlOptions(val_size, eval_on_train, fields)
        if _is_dataset(data):
            pairs, source = dataset_pairs(str(data), split, options)
        else:
            pairs, source = file_pairs(data, split, options), str(data)
        if options.eval_on_train:
            warnings.warn(ON_TRAIN_WARNING, stacklevel=2)
        return limited_task_data(
            pairs.train,
            pairs.evals,
            source,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            seed=seed,
            what="pairs",
            evaluated=pairs.evaluated,
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

        - exact_match: share of greedy generations equal to the completion, both
          stripped, over the pairs with a prompt (absent when every row is text);
        - mean_logprob: mean over pairs of the completion's mean token log-prob (<= 0);
          a text row's is its text's, after its first token.

        ``predictions`` gets per pair: prompt, reference (the completion), output (the
        generation), logprob (the completion's mean token log-prob) and correct (exact
        match); a text row's line has no output and is tagged ``"metric":
        "mean_logprob"``, as it has no exact match.
        """
        prompts = [r.prompt for r in records]
        references = [r.completion for r in records]
        asked = [i for i, prompt in enumerate(prompts) if prompt != NO_PROMPT]
        generated = generate(
            model, tokenizer, [prompts[i] for i in asked], max_new_tokens, batch_size
        )
        outputs = dict(zip(asked, generated, strict=True))
        scores = completion_logprobs(model, tokenizer, prompts, references, batch_size)
        if predictions is not None:
            predictions += [
                _prediction(record, outputs.get(i), score)
                for i, (record, score) in enumerate(zip(records, scores, strict=True))
            ]
        metrics = {"mean_logprob": mean(scores)}
        if asked:
            wanted = [references[i] for i in asked]
            metrics = {"exact_match": text_exact_match(generated, wanted), **metrics}
        return metrics

    def baselines(self, records: list[Example]) -> dict[str, float]:
        """No model-free baseline for free text: {}."""
        return {}


def _prediction(record: Example, output: str | None, score: float) -> dict[str, Any]:
    """A predictions line: a pair's generation and exact match, or a text row's score."""
    line: dict[str, Any] = {"prompt": record.prompt, "reference": record.completion}
    if output is None:
        return {**line, "logprob": score, "metric": "mean_logprob"}
    return {
        **line,
        "output": output,
        "logprob": score,
        "correct": text_matches(output, record.completion),
    }
