"""Running SQL in throwaway in-memory SQLite databases built from a task's scripts.

A *script* is the SQL that builds one database: a record's context (CREATE TABLE,
and INSERTs when it has data), optionally followed by rows we generated. Each script
is run once into a template database (:class:`Databases`); each query then runs on a
fresh copy of that template (``Connection.backup``), so a predicted UPDATE or DROP
cannot affect the next query, and its effect is seen in the tables it leaves behind.

Generated SQL is untrusted: it may not attach files (an authorizer refuses ATTACH,
which VACUUM INTO also uses), it stops after ``QUERY_SECONDS``, it may return at most
``MAX_RESULT_ROWS`` rows, and any exception while running it means it failed.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType

from molf.errors import MolfError

QUERY_SECONDS = 2.0  # a generated query running longer than this counts as failing
GOLD_SECONDS = 30.0  # the budget of a gold query (slow machines must not fail it)
MAX_RESULT_ROWS = 100_000  # a query returning more rows counts as failing


@dataclass(frozen=True)
class Outcome:
    """What a query did: its result rows in the order returned, and ``tables``: every
    table's rows afterwards (multisets), or None when it left the database unchanged
    (no row changed, schema not altered)."""

    rows: tuple[tuple, ...]
    tables: dict[str, Counter] | None = None


def outcomes_agree(predicted: Outcome, gold: Outcome, ordered: bool) -> bool:
    """Same effect on the tables, and the same result rows: as multisets, or as lists
    when ``ordered`` (the gold query sorts its result)."""
    if predicted.tables != gold.tables:
        return False
    if ordered:
        return predicted.rows == gold.rows
    return Counter(predicted.rows) == Counter(gold.rows)


def open_database(script: str) -> sqlite3.Connection:
    """An in-memory database after running ``script`` (raises sqlite3 errors if it fails),
    with the no-ATTACH authorizer set."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(script)
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


class Databases:
    """Template databases, each built once from its script, and isolated runs of SQL on
    copies of them. Use as a context manager (or call ``close``) to free them."""

    def __init__(self) -> None:
        self._templates: dict[str, sqlite3.Connection] = {}

    def template(self, script: str, name: str) -> sqlite3.Connection:
        """The database ``script`` builds; a script that fails is the record's fault:
        MolfError naming ``name``."""
        conn = self._templates.get(script)
        if conn is None:
            try:
                conn = open_database(script)
            except (sqlite3.Error, sqlite3.Warning) as e:
                raise MolfError(
                    f"{name}: the SQL context does not execute in SQLite ({e}); "
                    "fix or remove the record"
                ) from e
            self._templates[script] = conn
        return conn

    def run(self, script: str, sql: str, name: str, seconds: float | None = None) -> Outcome | None:
        """The outcome of one statement on a fresh copy of ``script``'s database; None if
        it fails: an error of any kind, several statements, an empty string, more than
        ``MAX_RESULT_ROWS`` rows, or running past ``seconds`` (``QUERY_SECONDS``)."""
        template = self.template(script, name)
        if not sql.strip():
            return None
        conn = sqlite3.connect(":memory:")
        try:
            template.backup(conn)
            conn.set_authorizer(_no_files)
            return _run(conn, sql, QUERY_SECONDS if seconds is None else seconds)
        except Exception:  # untrusted SQL: whatever goes wrong, the query failed
            return None
        finally:
            conn.close()

    def has_rows(self, script: str, name: str) -> bool:
        """Whether ``script``'s database holds any data (schema-only contexts do not)."""
        return any(table_rows(self.template(script, name)).values())

    def close(self) -> None:
        for conn in self._templates.values():
            conn.close()
        self._templates.clear()

    def __enter__(self) -> Databases:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _run(conn: sqlite3.Connection, sql: str, seconds: float) -> Outcome | None:
    """Run ``sql`` on ``conn`` under the time and row limits (exceptions propagate)."""
    changes = conn.total_changes
    (schema,) = conn.execute("PRAGMA schema_version").fetchone()
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
    cursor = conn.execute(sql)
    rows = cursor.fetchmany(MAX_RESULT_ROWS + 1)
    conn.set_progress_handler(None, 0)
    if len(rows) > MAX_RESULT_ROWS:
        return None
    (schema_after,) = conn.execute("PRAGMA schema_version").fetchone()
    changed = conn.total_changes != changes or schema_after != schema
    return Outcome(tuple(tuple(row) for row in rows), table_rows(conn) if changed else None)


def execute(script: str, sql: str, name: str) -> Outcome | None:
    """:meth:`Databases.run` on a database used once (for a single query)."""
    with Databases() as databases:
        return databases.run(script, sql, name)


def table_names(conn: sqlite3.Connection) -> list[str]:
    """The names of the database's user tables (not SQLite's own ``sqlite_*`` ones)."""
    query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    return [name for (name,) in conn.execute(query)]


def table_rows(conn: sqlite3.Connection) -> dict[str, Counter]:
    """Every user table's rows as a multiset."""
    return {
        n: Counter(conn.execute(f"SELECT * FROM {quote(n)}").fetchall()) for n in table_names(conn)
    }


def quote(identifier: str) -> str:
    """``identifier`` as a double-quoted SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def has_rows(script: str) -> bool:
    """Whether the script's database holds any data (schema-only contexts do not)."""
    conn = open_database(script)
    try:
        return any(table_rows(conn).values())
    finally:
        conn.close()


@lru_cache(maxsize=1024)
def column_names(script: str) -> frozenset[str]:
    """The lower-case names of every column of every table ``script`` creates (empty if
    the script does not run)."""
    try:
        conn = open_database(script)
    except (sqlite3.Error, sqlite3.Warning):
        return frozenset()
    try:
        return frozenset(
            str(row[1]).lower()
            for table in table_names(conn)
            for row in conn.execute(f"PRAGMA table_info({quote(table)})")
        )
    finally:
        conn.close()
