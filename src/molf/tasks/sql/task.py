"""Text-to-SQL: a schema (or schema plus data) and a question in, one SQL query out.

Two sources, one record type. The hub set ``gretelai/synthetic_text_to_sql``
(``sql_prompt``, ``sql_context`` with CREATE and INSERT statements, ``sql``) has
data, so predictions can be checked by running them. Local Spider (``dev.json`` +
``tables.json``) has schemas only: its context is CREATE TABLE statements written
from ``tables.json``, and its evaluation records carry ``VARIANTS`` sets of seeded
random rows (:mod:`molf.tasks.sql.populate`, with values from the literals of all the
gold queries on the same database) on which predictions and gold queries are run.

Splits (train, val, test) are fixed by hashes, not by ``--seed``; which records go
where, and the ``--data PATH#by-question`` mode for Spider, are defined in
:mod:`molf.tasks.sql.split`. Metrics are defined in :mod:`molf.tasks.sql.score`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import DataPath, Example, TaskData
from molf.tasks.scoring import generate
from molf.tasks.sources import (
    Origin,
    Row,
    check_split,
    describe,
    existing_path,
    hub_rows,
    limited_task_data,
    parse_rows,
    read_rows,
    text,
)
from molf.tasks.sql.literals import query_literals
from molf.tasks.sql.populate import variant_scripts
from molf.tasks.sql.score import judge_all, record_scripts, summarize
from molf.tasks.sql.spider import SpiderSchema, create_tables, spider_schemas
from molf.tasks.sql.split import (
    BY_DATABASE,
    BY_QUESTION,
    MODE_SEPARATOR,
    data_and_mode,
    database_sides,
    hub_test_side,
    question_side,
)
from molf.tasks.sql.sqlite import GOLD_SECONDS, Databases, column_names
from molf.tasks.sql.text import postprocess_sql

HUB_ID = "gretelai/synthetic_text_to_sql"
SPIDER_QUESTIONS = "dev.json"  # read when --data is a directory
SPIDER_TABLES = "tables.json"  # always read from beside the questions file


@dataclass(frozen=True)
class SqlRecord:
    question: str
    context: str  # SQL run first: CREATE TABLE statements, and INSERTs when there is data
    query: str  # the gold SQL
    origin: Origin
    db_id: str | None = None  # Spider's database; None for hub-layout rows
    variants: tuple[str, ...] = ()  # INSERTs of each generated set of rows (Spider eval)

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
    """A record from a Spider question row; its context is its database's schema
    (``schemas``: db_id -> CREATE TABLE statements)."""
    db_id = text(row, "db_id", origin)
    if db_id not in schemas:
        raise origin.error("db_id", f"database {db_id!r} is not described in {SPIDER_TABLES}")
    return SqlRecord(
        text(row, "question", origin), schemas[db_id], text(row, "query", origin), origin, db_id
    )


def check_record(record: SqlRecord, databases: Databases | None = None) -> SqlRecord:
    """The record, if its context builds a database and its gold query executes there
    (on each variant, when it has generated rows); else DataError naming the field."""
    context_field, query_field = ("db_id", "query") if record.db_id else ("sql_context", "sql")
    own = databases is None
    databases = Databases() if databases is None else databases
    try:
        try:
            databases.template(record.context, record.name)
        except MolfError as e:
            raise record.origin.error(
                context_field, f"the context does not execute in SQLite: {e.__cause__}"
            ) from e
        for n, script in enumerate(record_scripts(record)):
            if databases.run(script, record.query, record.name, GOLD_SECONDS) is None:
                where = f" on generated rows (variant {n})" if record.variants else ""
                raise record.origin.error(
                    query_field, f"the gold query does not execute in SQLite{where}"
                )
    finally:
        if own:
            databases.close()
    return record


def checked(records: list[SqlRecord]) -> list[SqlRecord]:
    """:func:`check_record` of each record, sharing template databases."""
    with Databases() as databases:
        return [check_record(r, databases) for r in records]


def sql_splits(data: str | None, split: str) -> tuple[list[SqlRecord], list[SqlRecord], str]:
    """Train records, checked ``split`` records (see ``check_record``) and a source
    description, as :mod:`molf.tasks.sql.split` defines the splits.

    Bad rows in a local file raise; bad hub rows (not the user's to fix) are skipped.
    """
    if data is None:
        return hub_splits(split)
    path_text, mode = data_and_mode(data)
    path = existing_path(path_text)
    questions = existing_path(str(path / SPIDER_QUESTIONS)) if path.is_dir() else path
    rows = read_rows(questions)
    if rows and "sql_prompt" in rows[0][1]:
        if mode == BY_DATABASE:
            raise MolfError(
                f"--data {data}: hub-layout rows have no databases to split by; "
                f"drop '{MODE_SEPARATOR}{BY_DATABASE}' (they are split by question)"
            )
        return hub_layout_file_splits(rows, questions, split)
    return spider_splits(rows, questions, mode or BY_DATABASE, split)


def hub_splits(split: str) -> tuple[list[SqlRecord], list[SqlRecord], str]:
    """The hub's train split, and the ``split`` half of its test split, checked."""
    train, skipped_train = parse_rows(hub_rows(HUB_ID, "train"), parse_gretel_row, skip_bad=True)
    held = [(o, r) for o, r in hub_rows(HUB_ID, "test") if _hub_side(r) == split]
    evals, skipped_eval = parse_rows(held, _checked_gretel_row, skip_bad=True)
    source = f"hub:{HUB_ID} (train; {split}: a question-hash half of test)"
    return train, evals, describe(source, skipped_train + skipped_eval)


def hub_layout_file_splits(
    rows: list[Row], path: Path, split: str
) -> tuple[list[SqlRecord], list[SqlRecord], str]:
    """A local file of hub-layout rows split by question hash; ``split`` records checked."""
    records = parse_rows(rows, parse_gretel_row, skip_bad=False)[0]
    sides = [question_side(r.question) for r in records]
    return (
        [r for r, side in zip(records, sides, strict=True) if side == "train"],
        checked([r for r, side in zip(records, sides, strict=True) if side == split]),
        f"{path} (question-hash train/val/test 60/20/20; evaluating {split})",
    )


def _hub_side(row: dict[str, Any]) -> str:
    """The hub test row's half ("val" or "test"); a row without a question string is
    malformed, and goes to test, where parsing skips and counts it."""
    question = row.get("sql_prompt")
    return hub_test_side(question) if isinstance(question, str) else "test"


def _checked_gretel_row(row: dict[str, Any], origin: Origin) -> SqlRecord:
    return check_record(parse_gretel_row(row, origin))


def spider_splits(
    rows: list[Row], questions: Path, mode: str, split: str
) -> tuple[list[SqlRecord], list[SqlRecord], str]:
    """Spider train records and checked, populated ``split`` records, split by ``mode``."""
    schemas = read_spider_schemas(questions.parent / SPIDER_TABLES)
    records = spider_records(rows, schemas)
    if mode == BY_QUESTION:
        side = {r.question: question_side(r.question) for r in records}
        train = [r for r in records if side[r.question] == "train"]
        held = [r for r in records if side[r.question] == split]
        detail = "split by question hash, 60/20/20, databases shared"
    else:
        sides = database_sides(Counter(str(r.db_id) for r in records))
        train = [r for r in records if sides[str(r.db_id)] == "train"]
        held = [r for r in records if sides[str(r.db_id)] == split]
        counts = Counter(sides.values())
        detail = (
            f"split by database: {counts['train']} train / {counts['val']} val / "
            f"{counts['test']} test databases"
        )
    evals = checked(with_variants(held, records, schemas))
    return train, evals, f"{questions} ({detail}; evaluating {split})"


def read_spider_schemas(tables: Path) -> dict[str, SpiderSchema]:
    """The schemas of ``tables.json``; MolfError when it is missing."""
    if not tables.is_file():
        raise MolfError(f"Spider questions need {SPIDER_TABLES} beside them; {tables} is missing")
    return spider_schemas(read_rows(tables))


def spider_records(rows: list[Row], schemas: Mapping[str, SpiderSchema]) -> list[SqlRecord]:
    """Records for Spider question rows, with contexts written from ``schemas``."""
    ddl = {db_id: create_tables(schema) for db_id, schema in schemas.items()}
    return parse_rows(rows, partial(parse_spider_row, schemas=ddl), skip_bad=False)[0]


def with_variants(
    records: list[SqlRecord], every: list[SqlRecord], schemas: Mapping[str, SpiderSchema]
) -> list[SqlRecord]:
    """``records`` with the generated rows of their database (:mod:`molf.tasks.sql.populate`), drawn
    with the literals of the gold queries of ``every`` record on that database."""
    scripts: dict[str, tuple[str, ...]] = {}
    for db_id in sorted({r.db_id for r in records if r.db_id is not None}):
        context = next(r.context for r in records if r.db_id == db_id)
        queries = [r.query for r in every if r.db_id == db_id]
        literals = query_literals(queries, column_names(context))
        scripts[db_id] = variant_scripts(schemas[db_id], literals)
    return [
        dataclasses.replace(r, variants=scripts[r.db_id]) if r.db_id is not None else r
        for r in records
    ]


class SqlTask:
    """Text-to-SQL; results lead with exact match, the one metric every source supports."""

    name = "sql"
    primary_metric = "exact_match"
    settings = ()  # no settings of its own
    max_new_tokens = 256

    def data_path(self, data: str) -> DataPath:
        """The file or directory ``data`` names, and its split mode: Spider's
        ``DIR#by-question`` is DIR split by question (see :mod:`molf.tasks.sql.split`)."""
        path, mode = data_and_mode(data)
        return DataPath(Path(path).expanduser(), mode)

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",
    ) -> TaskData:
        """Training pairs and the held-out ``split`` ("val" or "test") records, whose
        context and gold SQL run in SQLite; ``seed`` only orders the capped samples."""
        train, evals, source = sql_splits(data, check_split(split))
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
        predictions: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Greedy SQL for each record, cleaned by ``postprocess_sql``, scored by
        :mod:`molf.tasks.sql.score`.

        ``predictions`` gets per record: prompt, reference (gold SQL), output (the
        generated text), sql (after ``postprocess_sql``), correct (exact match, the
        primary metric), executes and execution_match (None without data).
        """
        prompts = [sql_prompt(r) for r in records]
        generated = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        cleaned = [_cleaned(g) for g in generated]
        judgements = judge_all(records, cleaned)
        if predictions is not None:
            for record, prompt, output, sql, judgement in zip(
                records, prompts, generated, cleaned, judgements, strict=True
            ):
                predictions.append(
                    {
                        "prompt": prompt,
                        "reference": record.query,
                        "output": output,
                        "sql": sql,
                        "correct": judgement.exact_match,
                        "executes": judgement.executes,
                        "execution_match": judgement.execution_match,
                    }
                )
        return summarize(judgements)

    def baselines(self, records: list[SqlRecord]) -> dict[str, float]:
        """No model-free baseline is meaningful for generated SQL: {}."""
        return {}


def _cleaned(generated: str) -> str:
    """``postprocess_sql`` of a generation; the stripped text itself if that fails."""
    try:
        return postprocess_sql(generated)
    except Exception:  # a safety net: one odd generation must not end an evaluation
        return generated.strip()
