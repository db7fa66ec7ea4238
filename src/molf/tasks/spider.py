"""Spider schemas (``tables.json``) written as CREATE TABLE statements.

Spider ships no database contents here, so the SQL task's context for a Spider
question is its database's schema: column types, primary and foreign keys.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from functools import cache
from typing import Any

from molf.tasks.sources import Origin, Row, field, text, text_list
from molf.tasks.sql_exec import quote

SQLITE_TYPES = {
    "text": "TEXT",
    "number": "NUMERIC",
    "time": "DATETIME",
    "boolean": "BOOLEAN",
    "others": "TEXT",
}
_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def spider_schemas(rows: list[Row]) -> dict[str, str]:
    """``db_id`` -> CREATE TABLE statements, for every database in ``tables.json`` rows."""
    return {text(row, "db_id", origin): schema_ddl(row, origin) for origin, row in rows}


def schema_ddl(row: dict[str, Any], origin: Origin) -> str:
    """One database's CREATE TABLE statements, one line per table.

    Tables named ``sqlite_*`` are SQLite's own bookkeeping (made by AUTOINCREMENT)
    and cannot be created by hand, so they are left out.
    """
    tables = text_list(row, "table_names_original", origin)
    columns = _columns(row, origin, len(tables))
    primary = _indices(field(row, "primary_keys", origin), "primary_keys", origin, len(columns))
    foreign = field(row, "foreign_keys", origin)
    if not isinstance(foreign, list) or not all(
        isinstance(pair, list) and len(pair) == 2 for pair in foreign
    ):
        raise origin.error("foreign_keys", "must be a list of [column, referenced column] pairs")
    _indices(foreign, "foreign_keys", origin, len(columns))
    statements = []
    for t, table in enumerate(tables):
        if table.lower().startswith("sqlite_"):
            continue
        parts = [f"{identifier(name)} {kind}" for owner, name, kind in columns if owner == t]
        keys = [identifier(columns[i][1]) for i in primary if columns[i][0] == t]
        if keys:
            parts.append(f"PRIMARY KEY ({', '.join(keys)})")
        for source, target in foreign:
            if columns[source][0] == t:
                parts.append(
                    f"FOREIGN KEY ({identifier(columns[source][1])}) REFERENCES "
                    f"{identifier(tables[columns[target][0]])} ({identifier(columns[target][1])})"
                )
        statements.append(f"CREATE TABLE {identifier(table)} ({', '.join(parts)});")
    return "\n".join(statements)


def _columns(row: dict[str, Any], origin: Origin, n_tables: int) -> list[tuple[int, str, str]]:
    """(table index, name, SQLite type) per column; Spider's ``[-1, "*"]`` entry keeps index 0."""
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
        columns.append((entry[0], entry[1], SQLITE_TYPES[kind]))
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
