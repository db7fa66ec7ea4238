"""Text-to-SQL: a schema (or schema plus data) and a question in, one SQL query out.

Two sources, one record type. The hub set ``gretelai/synthetic_text_to_sql``
(``sql_prompt``, ``sql_context`` with CREATE and INSERT statements, ``sql``) has
data, so predictions can be checked by running them. Local Spider (``dev.json`` +
``tables.json``) has schemas only: its context is CREATE TABLE statements written
from ``tables.json`` and its train/eval split keeps each database on one side.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import Example, TaskData
from molf.tasks.metrics import mean
from molf.tasks.scoring import generate
from molf.tasks.sources import (
    Origin,
    Row,
    describe,
    existing_path,
    hub_rows,
    limited_task_data,
    parse_rows,
    read_rows,
    split,
    text,
)
from molf.tasks.spider import spider_schemas
from molf.tasks.sql_exec import Outcome, execute, has_rows, open_database
from molf.tasks.sql_text import is_valid_sql, postprocess_sql, sql_exact_match

HUB_ID = "gretelai/synthetic_text_to_sql"
SPIDER_QUESTIONS = "dev.json"  # read when --data is a directory
SPIDER_TABLES = "tables.json"  # always read from beside the questions file
EVAL_FRACTION = 0.2  # share of rows (hub-layout file) or databases (Spider) held out


@dataclass(frozen=True)
class SqlRecord:
    question: str
    context: str  # SQL run first: CREATE TABLE statements, and INSERTs when there is data
    query: str  # the gold SQL
    origin: Origin
    db_id: str | None = None  # Spider's database; None for hub-layout rows

    @property
    def name(self) -> str:
        return f"{self.origin.path}:{self.origin.line}"


def sql_prompt(record: SqlRecord) -> str:
    """Context, question, then "SQL:"; the completion is " <query>"."""
    return f"{record.context.strip()}\nQuestion: {record.question.strip()}\nSQL:"


def sql_example(record: SqlRecord) -> Example:
    return Example(sql_prompt(record), " " + record.query.strip())


def parse_gretel_row(row: dict[str, Any], origin: Origin) -> SqlRecord:
    """A record from a hub-layout row."""
    return SqlRecord(
        text(row, "sql_prompt", origin),
        text(row, "sql_context", origin),
        text(row, "sql", origin),
        origin,
    )


def parse_spider_row(row: dict[str, Any], origin: Origin, schemas: Mapping[str, str]) -> SqlRecord:
    """A record from a Spider question row; its context is its database's schema."""
    db_id = text(row, "db_id", origin)
    if db_id not in schemas:
        raise origin.error("db_id", f"database {db_id!r} is not described in {SPIDER_TABLES}")
    return SqlRecord(
        text(row, "question", origin), schemas[db_id], text(row, "query", origin), origin, db_id
    )


def check_record(record: SqlRecord) -> SqlRecord:
    """The record, if its context and its gold query execute in SQLite; else DataError."""
    context_field, query_field = ("db_id", "query") if record.db_id else ("sql_context", "sql")
    try:
        open_database(record.context).close()
    except (sqlite3.Error, sqlite3.Warning) as e:
        raise record.origin.error(
            context_field, f"the context does not execute in SQLite: {e}"
        ) from e
    if execute(record.context, record.query, record.name) is None:
        raise record.origin.error(query_field, "the gold query does not execute in SQLite")
    return record


def split_by_database(
    records: list[SqlRecord], seed: int
) -> tuple[list[SqlRecord], list[SqlRecord]]:
    """A seeded split of whole databases, so no eval database was seen in training."""
    databases = sorted({r.db_id for r in records if r.db_id is not None})
    if len(databases) < 2:
        raise MolfError(f"a database split needs questions on 2 or more databases, got {databases}")
    held_out = set(split(databases, EVAL_FRACTION, seed)[1])
    return (
        [r for r in records if r.db_id not in held_out],
        [r for r in records if r.db_id in held_out],
    )


def sql_splits(data: str | None, seed: int) -> tuple[list[SqlRecord], list[SqlRecord], str]:
    """Train records, checked eval records (see ``check_record``) and a source description.

    Bad rows in a local file raise; bad hub rows (not the user's to fix) are skipped.
    """
    if data is None:
        train, skipped_train = parse_rows(
            hub_rows(HUB_ID, "train"), parse_gretel_row, skip_bad=True
        )
        evals, skipped_eval = parse_rows(
            hub_rows(HUB_ID, "test"), _checked_gretel_row, skip_bad=True
        )
        return train, evals, describe(f"hub:{HUB_ID} (train / test)", skipped_train + skipped_eval)
    path = existing_path(data)
    questions = existing_path(str(path / SPIDER_QUESTIONS)) if path.is_dir() else path
    rows = read_rows(questions)
    if rows and "sql_prompt" in rows[0][1]:
        train_rows, eval_rows = split(rows, EVAL_FRACTION, seed)
        return (
            parse_rows(train_rows, parse_gretel_row, skip_bad=False)[0],
            parse_rows(eval_rows, _checked_gretel_row, skip_bad=False)[0],
            f"{questions} (seeded row split)",
        )
    train, evals = split_by_database(spider_records(rows, questions.parent / SPIDER_TABLES), seed)
    return train, [check_record(r) for r in evals], f"{questions} (seeded split by database)"


def _checked_gretel_row(row: dict[str, Any], origin: Origin) -> SqlRecord:
    return check_record(parse_gretel_row(row, origin))


def spider_records(rows: list[Row], tables: Path) -> list[SqlRecord]:
    """Records for Spider question rows, with contexts written from ``tables``."""
    if not tables.is_file():
        raise MolfError(f"Spider questions need {SPIDER_TABLES} beside them; {tables} is missing")
    parse = partial(parse_spider_row, schemas=spider_schemas(read_rows(tables)))
    return parse_rows(rows, parse, skip_bad=False)[0]


def sql_metrics(records: list[SqlRecord], predictions: list[str]) -> dict[str, float]:
    """Metrics of cleaned-up predicted SQL against the records' gold queries.

    - exact_match: equal after sqlglot normalisation (case, spacing, final ';' ignored);
    - valid_sql: sqlglot parses the prediction as one SQLite statement;
    - executes: the prediction runs without error on the record's context database;
    - execution_accuracy: the prediction's result rows and resulting tables equal the
      gold query's (as multisets), over records whose context holds data; reported
      only when some do, with execution_coverage = the share of records it covers.
      Schema-only contexts (Spider) have empty tables, where any runnable query
      "matches", so they get `executes` and no execution accuracy.
    """
    pairs = list(zip(records, predictions, strict=True))
    outcomes = [execute(r.context, p, r.name) for r, p in pairs]
    metrics = {
        "exact_match": mean([float(sql_exact_match(p, r.query)) for r, p in pairs]),
        "valid_sql": mean([float(is_valid_sql(p)) for p in predictions]),
        "executes": mean([float(o is not None) for o in outcomes]),
    }
    with_data = [(r, o) for r, o in zip(records, outcomes, strict=True) if has_rows(r.context)]
    if with_data:
        matches = [float(o is not None and o == gold_outcome(r)) for r, o in with_data]
        metrics["execution_accuracy"] = mean(matches)
        metrics["execution_coverage"] = len(with_data) / len(records)
    return metrics


def gold_outcome(record: SqlRecord) -> Outcome:
    """What the gold query does; a gold query that fails is the record's fault: MolfError."""
    outcome = execute(record.context, record.query, record.name)
    if outcome is None:
        raise MolfError(f"{record.name}: the gold query does not execute in SQLite; fix the record")
    return outcome


class SqlTask:
    """Text-to-SQL; results lead with exact match, the one metric every source supports."""

    name = "sql"
    primary_metric = "exact_match"
    max_new_tokens = 256

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",
    ) -> TaskData:
        """Training pairs and evaluation records whose context and gold SQL run in SQLite."""
        train, evals, source = sql_splits(data, seed)
        return limited_task_data(
            train,
            evals,
            source,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            seed=seed,
            to_example=sql_example,
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[SqlRecord],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
    ) -> dict[str, float]:
        """Greedy SQL for each record, cleaned by ``postprocess_sql``, scored by ``sql_metrics``."""
        generated = generate(
            model, tokenizer, [sql_prompt(r) for r in records], max_new_tokens, batch_size
        )
        return sql_metrics(records, [postprocess_sql(g) for g in generated])
