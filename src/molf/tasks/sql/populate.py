"""Seeded random rows for a Spider schema, so that queries can be compared by their results.

Spider's databases ship here without rows; on empty tables every query that runs
returns nothing, so execution says nothing about correctness. This module fills a
schema with random rows, ``VARIANTS`` times with different seeds (the idea behind
test-suite accuracy, Zhong et al., 2020: a wrong query rarely agrees with the gold
query on several random databases).

How one variant is drawn (``random.Random`` seeded by ``POPULATE_SALT``, the database
id and the variant number, so the same schema and literals give the same rows):

- each created table gets ``ROWS_PER_TABLE`` rows (a random count in that range);
- a value of a column is, with probability ``LITERAL_SHARE`` when there are any, one
  of its *candidates* from the queries (:mod:`molf.tasks.sql.literals`): for a text
  column its column literals; for a number column its column literals and the
  database's loose numbers, each also plus and minus 1 (so ``<`` and ``<=`` differ);
  otherwise a *fresh* value by type: text and others from a small vocabulary
  (``WORDS`` and the database's loose strings), numbers an integer from 0 to 20 or
  (one time in four, outside primary keys) a float with one decimal from 0 to 100,
  times a date from 1990 to 2020, booleans 'T' or 'F'. Small vocabularies make
  equality predicates and joins on text columns match sometimes;
- a non-key value is NULL with probability ``NULL_SHARE``;
- a single-column primary key gets distinct values; a foreign key column gets values
  of the column it references (distinct ones when it is also its table's single-column
  key), drawn once that table's rows are final (tables in dependency order; on a
  cycle, index order); a column referencing several columns gets values found in all
  of them (when there are none, in the first); rows whose composite key repeats an
  earlier row's are dropped;
- every value is kept as the column stores it (SQLite type affinity, see ``stored``),
  so key uniqueness is checked on the values the database will hold.
"""

from __future__ import annotations

import random
from graphlib import CycleError, TopologicalSorter

from molf.tasks.sql.literals import Literals, Value
from molf.tasks.sql.spider import SpiderSchema, identifier

POPULATE_SALT = "molf-sql-populate-v1"
VARIANTS = 3
ROWS_PER_TABLE = (5, 15)
LITERAL_SHARE = 0.5
NULL_SHARE = 0.05
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")

Row = list[Value | None]


def variant_scripts(
    schema: SpiderSchema, literals: Literals, variants: int = VARIANTS
) -> tuple[str, ...]:
    """INSERT statements for each variant (run them after the schema's CREATE TABLEs)."""
    return tuple(insert_script(schema, populate(schema, literals, v)) for v in range(variants))


def populate(schema: SpiderSchema, literals: Literals, variant: int) -> dict[int, list[Row]]:
    """Rows of each created table (values in the order of ``schema.table_columns``)."""
    rng = random.Random(f"{POPULATE_SALT}:{schema.db_id}:{variant}")
    draw = _Drawer(rng, literals)
    references = _references(schema)
    tables = [t for t in range(len(schema.tables)) if schema.created(t)]
    rows = {t: _own_rows(schema, t, references, draw) for t in tables}
    for t in _dependency_order(schema, tables, references):
        columns = schema.table_columns(t)
        key = schema.key(t)
        for position, column in enumerate(columns):
            if column not in references:
                continue
            pool = _referenced_values(schema, rows, references[column])
            kind = schema.columns[column].kind
            if key == [column]:
                rows[t] = rows[t][: len(pool)]
                for row, value in zip(rows[t], rng.sample(pool, len(rows[t])), strict=True):
                    row[position] = stored(kind, value)
            else:
                for row in rows[t]:
                    row[position] = stored(kind, rng.choice(pool)) if pool else None
        rows[t] = _unique_keys(rows[t], [columns.index(c) for c in key])
    return rows


def _referenced_values(
    schema: SpiderSchema, rows: dict[int, list[Row]], targets: list[int]
) -> list[Value]:
    """The non-NULL values found in every one of the ``targets`` columns (when none is
    common to all, those of the first), sorted."""
    pools = []
    for target in targets:
        table = schema.columns[target].table
        position = schema.table_columns(table).index(target)
        pools.append({row[position] for row in rows[table]} - {None})
    common = set.intersection(*pools)
    return sorted(common or pools[0], key=repr)


def _references(schema: SpiderSchema) -> dict[int, list[int]]:
    """Foreign key column -> the columns it references, for keys between created tables."""
    references: dict[int, list[int]] = {}
    for source, target in schema.foreign_keys:
        columns = schema.columns
        if schema.created(columns[source].table) and schema.created(columns[target].table):
            if target not in references.setdefault(source, []):
                references[source].append(target)
    return references


def _dependency_order(
    schema: SpiderSchema, tables: list[int], references: dict[int, list[int]]
) -> list[int]:
    """Tables after the tables their foreign keys reference (index order on a cycle)."""
    graph: dict[int, set[int]] = {t: set() for t in tables}
    for source, targets in references.items():
        table = schema.columns[source].table
        graph[table] |= {schema.columns[t].table for t in targets} - {table}
    try:
        return list(TopologicalSorter(graph).static_order())
    except CycleError:
        return tables


def _own_rows(
    schema: SpiderSchema, table: int, references: dict[int, list[int]], draw: _Drawer
) -> list[Row]:
    """The table's rows with every column drawn except foreign keys (None for now)."""
    n = draw.rng.randint(*ROWS_PER_TABLE)
    key = schema.key(table)
    values: list[list[Value | None]] = []
    for column in schema.table_columns(table):
        spec = schema.columns[column]
        if column in references:
            values.append([None] * n)
        elif key == [column]:
            values.append(draw.distinct(spec.kind, spec.name, n))
        else:
            in_key = column in key
            values.append([draw.value(spec.kind, spec.name, in_key) for _ in range(n)])
    return [list(row) for row in zip(*values, strict=True)] if values else []


def _unique_keys(rows: list[Row], key: list[int]) -> list[Row]:
    """``rows`` without those whose key values repeat an earlier row's."""
    if not key:
        return rows
    seen: set[tuple] = set()
    kept = []
    for row in rows:
        values = tuple(row[i] for i in key)
        if values not in seen:
            seen.add(values)
            kept.append(row)
    return kept


class _Drawer:
    """Draws column values as the module docstring describes."""

    def __init__(self, rng: random.Random, literals: Literals) -> None:
        self.rng = rng
        self.literals = literals
        self.vocabulary = [*WORDS, *sorted(v for v in literals.loose if isinstance(v, str))]
        loose_numbers = [v for v in literals.loose if not isinstance(v, str)]
        self.loose_numbers = _near(loose_numbers)

    def candidates(self, kind: str, column: str) -> list[Value]:
        own = self.literals.by_column.get(column.lower(), set())
        if kind == "number":
            return sorted(
                {*_near([v for v in own if not isinstance(v, str)]), *self.loose_numbers}
                | {v for v in own if isinstance(v, str)},
                key=repr,
            )
        return sorted(own, key=repr)

    def fresh(self, kind: str, key: bool = False) -> Value:
        rng = self.rng
        if kind == "number":
            if key or rng.random() < 0.75:
                return rng.randint(0, 20)
            return round(rng.uniform(0, 100), 1)
        if kind == "time":
            return f"{rng.randint(1990, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if kind == "boolean":
            return rng.choice(("T", "F"))
        return rng.choice(self.vocabulary)

    def value(self, kind: str, column: str, key: bool) -> Value | None:
        """A value of a column (a key column's is never NULL, nor a fresh float)."""
        if not key and self.rng.random() < NULL_SHARE:
            return None
        candidates = self.candidates(kind, column)
        if candidates and self.rng.random() < LITERAL_SHARE:
            return stored(kind, self.rng.choice(candidates))
        return stored(kind, self.fresh(kind, key))

    def distinct(self, kind: str, column: str, n: int) -> list[Value | None]:
        """``n`` distinct non-NULL values (numbered ones when draws keep repeating)."""
        values: list[Value | None] = []
        for _ in range(20 * n):
            if len(values) == n:
                break
            value = self.value(kind, column, key=True)
            if value not in values:
                values.append(value)
        number = 0
        while len(values) < n:
            number += 1
            value = 1000 + number if kind == "number" else f"{self.fresh(kind)} {number}"
            if value not in values:
                values.append(value)
        return values


def stored(kind: str, value: Value | None) -> Value | None:
    """``value`` as a column of Spider type ``kind`` stores it (SQLite type affinity):
    TEXT columns (text, others) store numbers as text; NUMERIC ones (number, time,
    boolean) store text that reads as a number as that number, and a float without a
    fraction (within 64-bit range) as an integer."""
    if value is None:
        return None
    if kind in ("text", "others"):
        return value if isinstance(value, str) else _as_text(value)
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                return value
    if isinstance(number, int) and not -(2**63) <= number < 2**63:
        return float(number)
    if isinstance(number, float) and number.is_integer() and -(2**63) <= number < 2**63:
        return int(number)
    return number


def _as_text(number: int | float) -> str:
    """A number as SQLite writes it as text (floats: 15 significant digits, always with a
    decimal point)."""
    if isinstance(number, int):
        return str(number)
    text = f"{number:.15g}"
    mantissa, e, exponent = text.partition("e")
    if "." not in mantissa and mantissa not in ("inf", "-inf", "nan"):
        mantissa += ".0"
    return mantissa + e + exponent


def _near(numbers: list[Value]) -> set[Value]:
    """Each number, and it plus and minus 1."""
    return {n + d for n in numbers if not isinstance(n, str) for d in (-1, 0, 1)}


def insert_script(schema: SpiderSchema, rows: dict[int, list[Row]]) -> str:
    """INSERT statements for ``rows`` (one statement per non-empty table)."""
    statements = []
    for table, table_rows in rows.items():
        if not table_rows:
            continue
        names = ", ".join(identifier(schema.columns[c].name) for c in schema.table_columns(table))
        values = ", ".join("(" + ", ".join(sql_value(v) for v in row) + ")" for row in table_rows)
        statements.append(
            f"INSERT INTO {identifier(schema.tables[table])} ({names}) VALUES {values};"
        )
    return "\n".join(statements)


def sql_value(value: Value | None) -> str:
    """A Python value as an SQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)
