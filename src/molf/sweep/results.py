"""What a sweep records: ``summary.csv`` rows and the lr choice (``results.md`` and
``selection.json`` are written by :mod:`molf.sweep.tables`).

Rows are kept as strings, exactly as they read back from the CSV, so a summary
committed in one session and read in the next gives the same choices and tables.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.sweep.grid import Cell, Group, LrPoint, Sweep

Row = dict[str, str]
LEAD = (
    "cell",
    "status",
    "model",
    "task",
    "method_label",
    "method",
    "lr",
    "lora_lr",
    "ranks",
    "seed",
    "split",
)
TAIL = (
    "steps",
    "batch",
    "train_seconds",
    "wall_seconds",
    "peak_memory_mb",
    "returncode",
    "settings_hash",
    "data_hash",
    "model_hash",
    "run_dir",
)
# Content hashes of what a cell reads (molf.sweep.inputs): a row whose hash differs
# from the current one is stale. Rows written before these columns existed lack them
# and are accepted: the committed studies ran on exactly this shared data and these
# packaged models; the columns are filled in when the summary is next rewritten.
# ``template_hash`` is there only for a cell with a --chat-template file.
INPUT_COLUMNS = ("data_hash", "model_hash", "template_hash")
# Settings that do not change a cell's numbers (where files go, logging, evaluation
# batching) or that name machine-specific paths (model, gguf_file, data: the
# data_hash and model_hash columns identify them by content; a chat_template file
# counts as "file", its template_hash column holds its content).
NOT_FINGERPRINTED = frozenset(
    {
        "output_dir",
        "resume",
        "overwrite",
        "model",
        "gguf_file",
        "data",
        "save_steps",
        "save_total_limit",
        "save_model",
        "save_merged",
        "logging_steps",
        "report_to",
        "parallel",
        "dist_timeout",
        "check_routing",
        "eval_batch_size",
        "eval_before",
        "gradient_checkpointing",
    }
)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def number(text: str | None) -> float:
    """A CSV cell as a float (NaN when empty or not a number)."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


@functools.cache
def _defaults() -> dict[str, Any]:
    from molf.train.args import TrainArgs

    return TrainArgs().to_dict()


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of the settings that decide a cell's numbers.

    Only values that differ from TrainArgs' defaults count, so adding a new field with
    a default later does not make earlier results look stale."""
    from molf.train.setting_values import CHAT_TEMPLATES

    defaults = _defaults()
    kept = {
        k: settings[k]
        for k in sorted(defaults)
        if k not in NOT_FINGERPRINTED and k in settings and settings[k] != defaults[k]
    }
    if kept.get("chat_template") not in (None, *CHAT_TEMPLATES):
        kept["chat_template"] = "file"  # a machine-specific path: template_hash has it
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def cell_row(cell: Cell, args: Any, run_dir: Path, wall_seconds: float | None) -> Row:
    """The summary row of a finished cell, from its run directory's ``eval.json``."""
    ev = json.loads((run_dir / "eval.json").read_text())
    row = base_row(cell, args, "ok")
    for metric, value in ev["after"].items():
        row[f"{cell.split}_{metric}"] = _text(value)
    for metric, value in ev.get("before", {}).items():
        row[f"{cell.split}_{metric}_before"] = _text(value)
    row["train_seconds"] = _text(ev.get("train_seconds"))
    row["wall_seconds"] = _text(None if wall_seconds is None else round(wall_seconds, 2))
    row["peak_memory_mb"] = _text(ev.get("peak_memory_mb"))
    row["returncode"] = "0"
    return row


def base_row(cell: Cell, args: Any, status: str) -> Row:
    """The identifying columns of a cell's row (metrics left out)."""
    from molf.train.methods import method_of

    return {
        "cell": cell.name,
        "status": status,
        "model": cell.group.model,
        "task": cell.group.task,
        "method_label": cell.group.method,
        "method": args.method,
        "lr": _text(args.lr),
        "lora_lr": _text(method_of(args).lora_lr(args)),
        "ranks": "+".join(str(r) for r in args.lora_ranks),
        "seed": _text(cell.seed),
        "split": cell.split,
        "steps": _text(args.max_steps),
        "batch": _text(args.batch_size * args.grad_accum),
        "settings_hash": fingerprint(args.to_dict()),
        **input_hashes(args),
        "run_dir": str(Path(args.output_dir)),
    }


def input_hashes(args: Any) -> Row:
    """A cell's ``data_hash``, ``model_hash`` and, with a --chat-template file,
    ``template_hash`` (content, not paths: the same on every machine that holds the
    same files)."""
    from molf.sweep.inputs import data_hash, model_hash, template_hash

    hashes = {
        "data_hash": data_hash(args.data),
        "model_hash": model_hash(args.model, args.gguf_file),
    }
    template = template_hash(args.chat_template)
    return hashes if template is None else {**hashes, "template_hash": template}


def read_summary(path: Path) -> dict[str, Row]:
    """Rows of an existing summary.csv by cell name (empty when there is none).

    Reads what a spreadsheet or another platform may have saved: a UTF-8 byte-order
    mark, CRLF line ends, quoted fields holding commas or line breaks. Refuses (one-line
    MolfError naming the file and line) what cannot be read unambiguously: a cell named
    twice, a row with more or fewer fields than the header, a row without a cell name,
    a header without ``cell`` or with a repeated column, text that is not UTF-8."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _parse_summary(path, csv.reader(f))
    except UnicodeDecodeError as e:
        raise MolfError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_summary(path: Path, reader: Any) -> dict[str, Row]:
    """Rows by cell name from a csv.reader over ``path`` (see :func:`read_summary`)."""
    header = _summary_header(path, reader)
    rows: dict[str, Row] = {}
    first_line: dict[str, int] = {}
    line = reader.line_num
    while True:
        start = line + 1  # a record may span lines (quoted line breaks)
        try:
            fields = next(reader, None)
        except csv.Error as e:
            raise MolfError(f"{path}:{start}: not valid CSV ({e})") from None
        line = reader.line_num
        if fields is None:
            return rows
        if not any(fields):
            continue  # a blank line, or a row of empty fields
        if len(fields) != len(header):
            raise MolfError(
                f"{path}:{start}: {len(fields)} fields where the header has {len(header)}; "
                "repair the row or delete it to rerun its cell"
            )
        row = dict(zip(header, fields))
        name = row["cell"]
        if not name:
            raise MolfError(f"{path}:{start}: a row without a cell name; delete the row")
        if name in rows:
            raise MolfError(
                f"{path}:{start}: cell {name} appears twice (first on line "
                f"{first_line[name]}); delete the row that is wrong"
            )
        rows[name], first_line[name] = row, start


def _summary_header(path: Path, reader: Any) -> list[str]:
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise MolfError(f"{path}:1: not valid CSV ({e})") from None
    if not header:
        return ["cell"]  # an empty file: no rows
    if "cell" not in header:
        raise MolfError(f"{path}:1: the header has no 'cell' column; is this a summary.csv?")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise MolfError(f"{path}:1: column {repeated[0]!r} appears twice in the header")
    return header


def write_summary(path: Path, rows: dict[str, Row]) -> None:
    """Rewrite summary.csv atomically: identifying columns, metrics (sorted), then costs."""
    from molf.atomic import write_text_atomic

    keys = {k for r in rows.values() for k in r}
    middle = sorted(keys - set(LEAD) - set(TAIL))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*LEAD, *middle, *TAIL], restval="")
    writer.writeheader()
    for row in rows.values():
        writer.writerow(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, out.getvalue())


def choose_lr(
    sweep: Sweep, group: Group, rows: dict[str, Row]
) -> tuple[LrPoint, list[dict]] | None:
    """The group's lr point with the best val primary metric, and the val table it was
    chosen from (the chosen entry says by which rule in ``chosen_by``). None while a
    val cell is not finished (or failed).

    A tie on the primary metric (a few examples often tie) is broken by the task's
    continuous score of the same examples, ``<primary>_margin`` (e.g. the mean
    log-prob margin of the wanted answer) when the rows have it, then by the smaller lr
    and the smaller lora_lr; NaN counts as worst."""
    if not group.needs_selection:
        return group.points[0], []
    column = f"val_{group.primary_metric}"
    margin = f"{column}_margin"
    table = []
    for cell in sweep.stage1(group):
        row = rows.get(cell.name)
        if row is None or row.get("status") != "ok":
            return None
        entry = {"cell": cell.name, "lr": cell.point.lr, "lora_lr": cell.point.lora_lr}
        entry[column] = number(row.get(column))
        if row.get(margin):
            entry[margin] = number(row.get(margin))
        table.append(entry)

    def score(entry: dict, name: str) -> float:
        value = entry.get(name, math.nan)
        return -math.inf if math.isnan(value) else value

    def key(entry: dict) -> tuple[float, float, float, float]:
        lrs = (-entry["lr"], -(entry["lora_lr"] or 0.0))
        return (score(entry, column), score(entry, margin), *lrs)

    best = max(table, key=key)
    tied = [e for e in table if score(e, column) == score(best, column)]
    if len(tied) == 1:
        rule = f"best {column}"
    elif score(best, margin) > max(score(e, margin) for e in tied if e is not best):
        rule = f"{len(tied)} tied on {column}; the best {margin}"
    else:
        rule = f"{len(tied)} tied on {column}; the smaller lr"
    best["chosen_by"] = rule
    return LrPoint(best["lr"], best["lora_lr"]), table
