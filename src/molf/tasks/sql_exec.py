"""Running SQL in throwaway in-memory SQLite databases built from a task's context.

Each query runs in a fresh database, so a predicted UPDATE or DROP cannot affect
the next query, and its effect is compared through the tables it leaves behind.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import dataclass

from molf.errors import MolfError

QUERY_SECONDS = 2.0  # a generated query running longer than this counts as failing


@dataclass(frozen=True)
class Outcome:
    """What a query did: its result rows and every table's rows afterwards (multisets)."""

    rows: Counter
    tables: dict[str, Counter]


def open_database(context: str) -> sqlite3.Connection:
    """An in-memory database after running ``context`` (raises sqlite3 errors if it fails)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(context)
    except (sqlite3.Error, sqlite3.Warning):
        conn.close()
        raise
    conn.set_authorizer(_no_files)
    return conn


def _no_files(action: int, *_: object) -> int:
    """Refuse ATTACH (also used by VACUUM INTO): generated SQL must not write files."""
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def execute(context: str, sql: str, name: str) -> Outcome | None:
    """The outcome of one statement on a fresh context database; None if it fails.

    Failing includes errors, several statements, an empty string, and running past
    ``QUERY_SECONDS``. A context that does not run is the record's fault: MolfError.
    """
    if not sql.strip():
        return None
    try:
        conn = open_database(context)
    except (sqlite3.Error, sqlite3.Warning) as e:
        raise MolfError(
            f"{name}: the SQL context does not execute in SQLite ({e}); fix or remove the record"
        ) from e
    deadline = time.monotonic() + QUERY_SECONDS
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    try:
        rows = Counter(tuple(row) for row in conn.execute(sql).fetchall())
        conn.set_progress_handler(None, 0)
        return Outcome(rows, table_rows(conn))
    except (sqlite3.Error, sqlite3.Warning):
        return None
    finally:
        conn.close()


def table_rows(conn: sqlite3.Connection) -> dict[str, Counter]:
    """Every user table's rows as a multiset."""
    names = [
        n
        for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {n: Counter(conn.execute(f"SELECT * FROM {quote(n)}").fetchall()) for n in names}


def quote(identifier: str) -> str:
    """``identifier`` as a double-quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def has_rows(context: str) -> bool:
    """Whether the context's database holds any data (schema-only contexts do not)."""
    conn = open_database(context)
    try:
        return any(table_rows(conn).values())
    finally:
        conn.close()
