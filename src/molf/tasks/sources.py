"""Where task rows come from: local JSON / JSON-lines files or the Hugging Face hub.

Both sources yield the same ``(Origin, dict)`` pairs, so every task parses hub rows
and local rows with one function, and a malformed row is reported the same way:
file (or hub split), 1-based line (or row number), field.

Held-out splits are decided by a hash, not a shuffle: :func:`hash_fraction` maps a
record's key (e.g. a question's text, normalised) to a number in [0, 1) through
sha256 with the fixed salt ``SPLIT_SALT``, and a split is an interval of that range.
So a record lands in the same split whatever the file order, the caps and ``--seed``,
and records with the same key never fall on both sides of a split.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from molf.errors import DataError, MolfError
from molf.tasks.base import Example, TaskData

T = TypeVar("T")
R = TypeVar("R")

SPLITS = ("val", "test")  # the held-out splits a task evaluates on (--eval-split)
SPLIT_SALT = "molf-split-v1"  # fixed on purpose: the splits must not move with --seed
EVAL_CAP_SEED = 0  # max_eval_samples picks the same records whatever --seed: seeds share a test set


@dataclass(frozen=True)
class Origin:
    """Where a row came from, so errors can point at it."""

    path: str
    line: int

    def error(self, field: str, problem: str) -> DataError:
        return DataError(self.path, self.line, field, problem)


Row = tuple[Origin, dict[str, Any]]


def existing_path(data: str) -> Path:
    """The user's ``--data`` path, or a MolfError saying it does not exist."""
    path = Path(data).expanduser()
    if not path.exists():
        raise MolfError(f"--data {data}: no such file or directory; pass an existing path")
    return path


def read_rows(path: Path) -> list[Row]:
    """Rows of a JSON-list file or a JSON-lines file (told apart by a leading '[')."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MolfError(f"{path}: cannot read it as UTF-8 text ({e}); pass a JSON file") from e
    if text.lstrip().startswith("["):
        return _json_list_rows(str(path), text)
    return _jsonl_rows(str(path), text)


def _jsonl_rows(path: str, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, number, "<json>", f"invalid JSON: {e.msg}") from e
        rows.append(_as_row(Origin(path, number), value))
    return rows


def _json_list_rows(path: str, text: str) -> list[Row]:
    """Decode a JSON list item by item, to know the line each item starts on."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    pos, line, counted = text.index("[") + 1, 1, 0
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]" and not rows:
            return rows
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, "<json>", f"invalid JSON: {e.msg}") from e
        rows.append(_as_row(Origin(path, line), value))
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            return rows
        else:
            line += text.count("\n", counted, pos)
            raise DataError(path, line, "<json>", "invalid JSON: expected ',' or ']' after an item")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _as_row(origin: Origin, value: Any) -> Row:
    if not isinstance(value, dict):
        raise origin.error("<row>", f"expected a JSON object, got {type(value).__name__}")
    return origin, value


def hub_rows(dataset_id: str, split: str) -> list[Row]:
    """Rows of one split of a hub dataset; ``datasets`` is an optional dependency."""
    datasets = _datasets()
    try:
        table = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, auth or cache problems all mean the same to the user
        raise MolfError(
            f"could not load hub dataset {dataset_id} (split {split}): {e}; "
            "check the network, or pass a local copy with --data PATH"
        ) from e
    name = f"hub:{dataset_id}[{split}]"
    return [(Origin(name, number), dict(row)) for number, row in enumerate(table, 1)]


# Local files that ``datasets`` reads (JSON and JSON lines are read here, naming lines).
DATASET_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise MolfError(
            "reading this data needs the 'datasets' package: pip install datasets "
            "(or pass a local JSON lines copy with --data PATH)"
        ) from e
    return datasets


def file_rows(path: Path) -> list[Row]:
    """Rows of a local file: JSON or JSON lines (:func:`read_rows`), or any format in
    :data:`DATASET_BUILDERS` through ``datasets``."""
    builder = DATASET_BUILDERS.get(path.suffix.lower())
    if builder is None:
        return read_rows(path)
    extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        table = _datasets().load_dataset(builder, data_files=str(path), split="train", **extra)
    except Exception as e:  # a malformed file: say which, in one line
        raise MolfError(f"--data {path}: cannot read it as {builder} ({e})") from None
    return [(Origin(str(path), number), dict(row)) for number, row in enumerate(table, 1)]


def dataset_splits(name: str) -> dict[str, list[Row]]:
    """Every split of a hub dataset id, or of a local directory in a hub dataset's
    layout, as rows (``datasets.load_dataset(name)``)."""
    try:
        loaded = _datasets().load_dataset(name)
    except Exception as e:  # network, auth, cache or layout: the same to the user
        raise MolfError(
            f"--data {name}: could not load it as a dataset ({str(e).splitlines()[0]}); "
            "check the id and the network, or pass a local file"
        ) from None
    return {
        split: [(Origin(f"{name}[{split}]", n), dict(row)) for n, row in enumerate(table, 1)]
        for split, table in loaded.items()
    }


def parse_rows(
    rows: list[Row], parse: Callable[[dict[str, Any], Origin], R], *, skip_bad: bool
) -> tuple[list[R], int]:
    """Records parsed from ``rows`` and how many rows were skipped.

    A malformed local row is the user's to fix, so it raises. Hub data is not the
    user's to fix, so with ``skip_bad`` such rows are dropped and counted instead.
    """
    records: list[R] = []
    skipped = 0
    for origin, row in rows:
        try:
            records.append(parse(row, origin))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    return records, skipped


def describe(source: str, skipped: int) -> str:
    """``source`` plus a note of skipped malformed rows, for ``TaskData.source``."""
    return f"{source} (skipped {skipped} malformed rows)" if skipped else source


def field(row: dict[str, Any], name: str, origin: Origin) -> Any:
    """``row[name]``, following dots into nested objects; missing or null is an error."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise origin.error(name, "missing; every row needs it")
        value = value[part]
    return value


def text(row: dict[str, Any], name: str, origin: Origin) -> str:
    """A required non-empty string field."""
    value = field(row, name, origin)
    if not isinstance(value, str) or not value.strip():
        raise origin.error(name, f"must be a non-empty string, got {value!r}")
    return value


def text_list(row: dict[str, Any], name: str, origin: Origin) -> tuple[str, ...]:
    """A required non-empty list of non-empty strings."""
    value = field(row, name, origin)
    if not isinstance(value, list) or not value:
        raise origin.error(name, f"must be a non-empty list of strings, got {value!r}")
    if not all(isinstance(item, str) and item.strip() for item in value):
        raise origin.error(name, "every item must be a non-empty string")
    return tuple(value)


def shuffled(items: Sequence[T], seed: int) -> list[T]:
    """A copy of ``items`` in a seeded random order (the same for the same seed)."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def take(items: Sequence[T], limit: int | None, seed: int, name: str) -> list[T]:
    """A seeded shuffle of ``items`` capped at ``limit``; ``name`` is the limit's option."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MolfError(f"{name} must be a positive integer or unset, got {limit!r}")
    return shuffled(items, seed)[:limit]


def check_split(split: str) -> str:
    """``split`` when it is "val" or "test"; a MolfError naming the choices otherwise."""
    if split not in SPLITS:
        raise MolfError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def normalised(text: str) -> str:
    """``text`` lower-cased, with every run of whitespace made one space, outer ones dropped."""
    return " ".join(text.lower().split())


def hash_fraction(key: str, salt: str = SPLIT_SALT) -> float:
    """A number in [0, 1) fixed by ``key``: the first 8 bytes of the sha256 of ``salt``, a
    NUL and ``normalised(key)`` (UTF-8), read as a big-endian integer, divided by 2**64."""
    digest = hashlib.sha256(f"{salt}\0{normalised(key)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_part(items: Sequence[T], key: Callable[[T], str], low: float, high: float) -> list[T]:
    """The items whose ``hash_fraction(key(item))`` lies in ``[low, high)``, in their order."""
    return [item for item in items if low <= hash_fraction(key(item)) < high]


def split(items: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded disjoint (train, eval) split; each side gets at least one item when it can."""
    order = shuffled(items, seed)
    n_eval = max(0, min(max(1, round(len(order) * eval_fraction)), len(order) - 1))
    return order[n_eval:], order[:n_eval]


def limited_task_data(
    train: Sequence[Any],
    evals: Sequence[Any],
    source: str,
    *,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    seed: int,
    to_example: Callable[[Any], Example] = lambda r: r,
    what: str = "questions",
    evaluated: str | None = None,
) -> TaskData:
    """Train and eval records capped by the max_*_samples options (seeded), checked
    non-empty, with the training and evaluation records turned into :class:`Example`
    pairs (``train``, ``eval_examples``);
    ``evaluated`` says which records ``evals`` are (``TaskData.evaluated`` adds their
    number after the cap)."""
    train = take(train, max_train_samples, seed, "max_train_samples")
    evals = take(evals, max_eval_samples, EVAL_CAP_SEED, "max_eval_samples")
    return TaskData(
        [to_example(r) for r in nonempty(train, f"training {what}", source)],
        nonempty(evals, f"evaluation {what}", source),
        source,
        f"{evaluated}: {len(evals)} {what}" if evaluated else "",
        [to_example(r) for r in evals],
    )


def nonempty(items: list[T], what: str, source: str) -> list[T]:
    """``items``, or a MolfError when filtering or limits left nothing."""
    if not items:
        raise MolfError(
            f"{source}: no {what} left after filtering and limits; "
            "check the data and the max_*_samples options"
        )
    return items
