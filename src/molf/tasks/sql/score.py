"""Scoring predicted SQL against a record's gold query: text, validity and execution.

The databases of a record (see :func:`record_scripts`): one per populated variant
when the record has generated rows (Spider), else its context alone. A record *has
data* when it has variants or its context inserts rows; execution accuracy is
measured on records with data only (on empty tables every runnable query "matches").

Per prediction (:class:`Judgement`):

- ``exact_match``: equal canonical forms (:func:`molf.tasks.sql.text.normalize_sql`,
  with the database's column names);
- ``parses``: sqlglot reads it; ``valid``: it is one query, DML or DDL statement;
- ``executes``: it runs without error, within the time and row limits, on every one of
  the record's databases;
- ``execution_match`` (records with data; None otherwise): it runs on every database
  and agrees with the gold query on each: same changes to the tables, and the same
  result rows, as multisets, or in the same order when the gold query's outermost
  statement has ORDER BY;
- ``nonempty_gold`` (records with data): on at least one database the gold query
  returns a row with a non-NULL value, or changes the tables; when it does neither
  anywhere, any runnable query returning nothing and changing nothing "matches" it.

Nothing about a prediction can raise here: failing to parse, normalise or run it
scores it wrong (and an unforeseen exception while judging it scores it wrong on
every count, ``parses`` included). A context or gold query that fails is the
record's fault: MolfError.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tqdm.auto import tqdm

from molf.errors import MolfError
from molf.tasks.metrics import mean
from molf.tasks.sql.sqlite import (
    GOLD_SECONDS,
    Databases,
    Outcome,
    column_names,
    outcomes_agree,
)
from molf.tasks.sql.text import normalize_parsed, parse_trees, single_statement, statement

_ORDER_BY = re.compile(r"\border\s+by\b", re.I)


class ScoredRecord(Protocol):
    """What scoring needs of a record (``molf.tasks.sql.task.SqlRecord`` has it)."""

    @property
    def context(self) -> str: ...
    @property
    def query(self) -> str: ...
    @property
    def variants(self) -> tuple[str, ...]: ...
    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class Judgement:
    """How one prediction scored (definitions in the module docstring)."""

    exact_match: bool
    parses: bool
    valid: bool
    executes: bool
    execution_match: bool | None
    nonempty_gold: bool | None


def record_scripts(record: ScoredRecord) -> tuple[str, ...]:
    """The scripts building the record's databases: its context followed by each
    variant's rows, or its context alone when it has no variants."""
    if not record.variants:
        return (record.context,)
    return tuple(f"{record.context}\n{rows}" for rows in record.variants)


def sorts_result(query: str) -> bool:
    """Whether the outermost statement of ``query`` has ORDER BY (text search when
    sqlglot cannot read it)."""
    tree = single_statement(query)
    if tree is None:
        return bool(_ORDER_BY.search(query))
    return tree.args.get("order") is not None


def nonempty(outcome: Outcome) -> bool:
    """Whether the result holds a row with a non-NULL value, or the tables changed."""
    return outcome.tables is not None or any(
        any(value is not None for value in row) for row in outcome.rows
    )


class Judge:
    """Scores predictions; gold outcomes and template databases are computed once."""

    def __init__(self, databases: Databases) -> None:
        self.databases = databases
        self._gold: dict[tuple[str, str], Outcome] = {}
        self._with_data: dict[str, bool] = {}
        self._gold_text: dict[tuple[str, str], tuple[str, bool]] = {}

    def gold_text(self, record: ScoredRecord) -> tuple[str, bool]:
        """The gold query's canonical form, and whether it sorts its result."""
        key = (record.context, record.query)
        if key not in self._gold_text:
            columns = column_names(record.context)
            canonical = normalize_parsed(record.query, single_statement(record.query), columns)
            self._gold_text[key] = (canonical, sorts_result(record.query))
        return self._gold_text[key]

    def has_data(self, record: ScoredRecord) -> bool:
        if record.variants:
            return True
        if record.context not in self._with_data:
            self._with_data[record.context] = self.databases.has_rows(record.context, record.name)
        return self._with_data[record.context]

    def gold(self, script: str, record: ScoredRecord) -> Outcome:
        """The gold query's outcome on ``script``'s database; MolfError if it fails."""
        key = (script, record.query)
        if key not in self._gold:
            outcome = self.databases.run(script, record.query, record.name, GOLD_SECONDS)
            if outcome is None:
                raise MolfError(
                    f"{record.name}: the gold query does not execute in SQLite; fix the record"
                )
            self._gold[key] = outcome
        return self._gold[key]

    def judge(self, record: ScoredRecord, sql: str) -> Judgement:
        """The prediction ``sql``'s :class:`Judgement`; MolfError if the record is bad."""
        scripts = record_scripts(record)
        for script in scripts:  # the record's own failures raise before the prediction runs
            self.databases.template(script, record.name)
        data = self.has_data(record)
        golds = [self.gold(script, record) for script in scripts] if data else []
        gold_canonical, ordered = self.gold_text(record)
        try:
            return self._judge_prediction(record, sql, scripts, golds, gold_canonical, ordered)
        except Exception:  # a safety net: no prediction may end an evaluation
            shows = any(nonempty(g) for g in golds) if data else None
            return Judgement(False, False, False, False, False if data else None, shows)

    def _judge_prediction(
        self,
        record: ScoredRecord,
        sql: str,
        scripts: tuple[str, ...],
        golds: list[Outcome],
        gold_canonical: str,
        ordered: bool,
    ) -> Judgement:
        trees = parse_trees(sql)
        tree = statement(trees)
        exact = normalize_parsed(sql, tree, column_names(record.context)) == gold_canonical
        outcomes: list[Outcome] = []
        for script in scripts:
            outcome = self.databases.run(script, sql, record.name)
            if outcome is None:
                break
            outcomes.append(outcome)
        executes = len(outcomes) == len(scripts)
        match = shows = None
        if golds:
            match = executes and all(
                outcomes_agree(o, g, ordered) for o, g in zip(outcomes, golds, strict=True)
            )
            shows = any(nonempty(g) for g in golds)
        return Judgement(
            exact_match=exact,
            parses=trees is not None,
            valid=tree is not None,
            executes=executes,
            execution_match=match,
            nonempty_gold=shows,
        )


def judge_all(records: Sequence[ScoredRecord], predictions: Sequence[str]) -> list[Judgement]:
    """A :class:`Judgement` per (record, predicted SQL), with a progress bar on a terminal."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records against {len(predictions)} predictions")
    with Databases() as databases:
        judge = Judge(databases)
        pairs = zip(records, predictions, strict=True)
        return [
            judge.judge(record, sql)
            for record, sql in tqdm(
                pairs, total=len(records), desc="running SQL", unit="query", disable=None
            )
        ]


def summarize(judgements: Sequence[Judgement]) -> dict[str, float]:
    """The metrics: shares of predictions that are exact_match, valid_sql, unparsable
    (do not parse) and executes; where some records have data, execution_accuracy
    (share of those whose prediction has execution_match), execution_coverage (share
    of records with data) and nonempty_gold (share of those with nonempty_gold)."""
    metrics = {
        "exact_match": mean([float(j.exact_match) for j in judgements]),
        "valid_sql": mean([float(j.valid) for j in judgements]),
        "unparsable": mean([float(not j.parses) for j in judgements]),
        "executes": mean([float(j.executes) for j in judgements]),
    }
    with_data = [j for j in judgements if j.execution_match is not None]
    if with_data:
        metrics["execution_accuracy"] = mean([float(bool(j.execution_match)) for j in with_data])
        metrics["execution_coverage"] = len(with_data) / len(judgements)
        metrics["nonempty_gold"] = mean([float(bool(j.nonempty_gold)) for j in with_data])
    return metrics


def sql_metrics(records: Sequence[ScoredRecord], predictions: Sequence[str]) -> dict[str, float]:
    """:func:`summarize` of :func:`judge_all`: metrics of cleaned-up predicted SQL."""
    return summarize(judge_all(records, predictions))
