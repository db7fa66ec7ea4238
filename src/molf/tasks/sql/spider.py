"""Spider schemas (``tables.json``) written as CREATE TABLE statements.

Spider ships no database contents here, so the SQL task's context for a Spider
question is its database's schema: column types, primary and foreign keys. The
parsed schema (:class:`SpiderSchema`) also tells :mod:`molf.tasks.sql.populate`
which rows it may generate.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from functools import cache
from typing import Any

from molf.tasks.sources import Origin, Row, field, text, text_list
from molf.tasks.sql.sqlite import quote

SQLITE_TYPES = {
    "text": "TEXT",
    "number": "NUMERIC",
    "time": "DATETIME",
    "boolean": "BOOLEAN",
    "others": "TEXT",
}
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SpiderColumn:
    """One column of a Spider database: its table's index, name and Spider type
    (``text``, ``number``, ``time``, ``boolean`` or ``others``)."""

    table: int
    name: str
    kind: str

    @property
    def sqlite_type(self) -> str:
        return SQLITE_TYPES[self.kind]


@dataclass(frozen=True)
class SpiderSchema:
    """One database of ``tables.json``: tables, columns (index 0 is Spider's ``*``),
    each table's primary key columns, and foreign keys as (column, referenced column)
    pairs of column indices."""

    db_id: str
    tables: tuple[str, ...]
    columns: tuple[SpiderColumn, ...]
    primary_keys: tuple[int, ...]  # column indices; a table's listed ones form its key
    foreign_keys: tuple[tuple[int, int], ...]

    def created(self, table: int) -> bool:
        """Whether the table is created: ``sqlite_*`` tables are SQLite's bookkeeping
        (made by AUTOINCREMENT) and cannot be created by hand, so they are left out."""
        return not self.tables[table].lower().startswith("sqlite_")

    def table_columns(self, table: int) -> list[int]:
        """Indices of the table's columns, in order."""
        return [i for i, column in enumerate(self.columns) if column.table == table]

    def key(self, table: int) -> list[int]:
        """Indices of the table's primary key columns (empty: no primary key)."""
        return [i for i in self.primary_keys if self.columns[i].table == table]


def spider_schemas(rows: list[Row]) -> dict[str, SpiderSchema]:
    """``db_id`` -> its schema, for every database in ``tables.json`` rows."""
    return {text(row, "db_id", origin): parse_schema(row, origin) for origin, row in rows}


def parse_schema(row: dict[str, Any], origin: Origin) -> SpiderSchema:
    """A ``tables.json`` row as a :class:`SpiderSchema`; DataError names a bad field."""
    tables = text_list(row, "table_names_original", origin)
    columns = _columns(row, origin, len(tables))
    primary = _indices(field(row, "primary_keys", origin), "primary_keys", origin, len(columns))
    foreign = field(row, "foreign_keys", origin)
    if not isinstance(foreign, list) or not all(
        isinstance(pair, list) and len(pair) == 2 for pair in foreign
    ):
        raise origin.error("foreign_keys", "must be a list of [column, referenced column] pairs")
    _indices(foreign, "foreign_keys", origin, len(columns))
    return SpiderSchema(
        text(row, "db_id", origin),
        tables,
        tuple(columns),
        tuple(primary),
        tuple((source, target) for source, target in foreign),
    )


def schema_ddl(row: dict[str, Any], origin: Origin) -> str:
    """One ``tables.json`` row's CREATE TABLE statements (see :func:`create_tables`)."""
    return create_tables(parse_schema(row, origin))


def create_tables(schema: SpiderSchema) -> str:
    """The database's CREATE TABLE statements, one line per created table, with column
    types, primary keys and foreign keys."""
    statements = []
    for t, table in enumerate(schema.tables):
        if not schema.created(t):
            continue
        columns = schema.columns
        parts = [
            f"{identifier(columns[i].name)} {columns[i].sqlite_type}"
            for i in schema.table_columns(t)
        ]
        keys = [identifier(columns[i].name) for i in schema.key(t)]
        if keys:
            parts.append(f"PRIMARY KEY ({', '.join(keys)})")
        for source, target in schema.foreign_keys:
            if columns[source].table == t:
                parts.append(
                    f"FOREIGN KEY ({identifier(columns[source].name)}) REFERENCES "
                    f"{identifier(schema.tables[columns[target].table])} "
                    f"({identifier(columns[target].name)})"
                )
        statements.append(f"CREATE TABLE {identifier(table)} ({', '.join(parts)});")
    return "\n".join(statements)


def _columns(row: dict[str, Any], origin: Origin, n_tables: int) -> list[SpiderColumn]:
    """The columns; Spider's ``[-1, "*"]`` entry keeps index 0."""
    names = field(row, "column_names_original", origin)
    types = field(row, "column_types", origin)
    if not isinstance(names, list) or not isinstance(types, list) or len(names) != len(types):
        raise origin.error("column_types", "must be a list as long as column_names_original")
    columns = []
    for entry, kind in zip(names, types, strict=True):
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], int)
            and -1 <= entry[0] < n_tables
            and isinstance(entry[1], str)
        ):
            raise origin.error(
                "column_names_original", f"entries must be [table index, name], got {entry!r}"
            )
        if kind not in SQLITE_TYPES:
            known = ", ".join(SQLITE_TYPES)
            raise origin.error("column_types", f"unknown type {kind!r}; known: {known}")
        columns.append(SpiderColumn(entry[0], entry[1], kind))
    return columns


def _indices(value: Any, name: str, origin: Origin, n_columns: int) -> list[int]:
    """Column indices, flattened (composite keys are nested lists), each a real column."""
    if not isinstance(value, list):
        raise origin.error(name, f"must be a list of column indices, got {value!r}")
    flat = [i for item in value for i in (item if isinstance(item, list) else [item])]
    if not all(isinstance(i, int) and 0 < i < n_columns for i in flat):
        raise origin.error(name, f"column indices must be integers from 1 to {n_columns - 1}")
    return flat


@cache
def identifier(name: str) -> str:
    """``name`` bare when SQLite accepts it as a bare name (shorter prompts), else quoted."""
    if _BARE.fullmatch(name):
        with closing(sqlite3.connect(":memory:")) as conn:
            try:
                conn.execute(f"CREATE TABLE {name} ({name} INTEGER)")
                return name
            except sqlite3.Error:
                pass
    return quote(name)
