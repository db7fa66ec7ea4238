"""Seeded rows for Spider schemas, and the query literals they are drawn with."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from molf.tasks.sources import Origin, read_rows
from molf.tasks.sql.literals import Literals, query_literals
from molf.tasks.sql.populate import (
    ROWS_PER_TABLE,
    VARIANTS,
    insert_script,
    populate,
    stored,
    variant_scripts,
)
from molf.tasks.sql.spider import (
    SpiderSchema,
    create_tables,
    identifier,
    parse_schema,
    spider_schemas,
)


def test_query_literals_files_constants_under_their_columns() -> None:
    queries = [
        'SELECT name FROM singer WHERE country = "France" AND age > 20',
        "SELECT * FROM t AS T1 WHERE T1.city IN ('Paris', 'Lyon') AND year BETWEEN 1990 AND 2000.5",
        "SELECT name FROM t WHERE name LIKE '%an_n%' GROUP BY x HAVING count(*) > 2 LIMIT 3",
        "SELECT a FROM t WHERE -5 < a",
        'SELECT "name" FROM t WHERE "Home Town" = \'Oslo\'',
        "SELECT 'unbalanced FROM t",  # sqlglot cannot read it: skipped
    ]
    found = query_literals(queries, {"name", "country", "age", "city", "year", "a", "home town"})
    assert found.by_column == {
        "country": {"France"},  # a double-quoted non-column is a string, as in SQLite
        "age": {20},
        "city": {"Paris", "Lyon"},
        "year": {1990, 2000.5},
        "name": {"ann"},  # LIKE pattern without its wildcards
        "a": {-5},
        "home town": {"Oslo"},
    }
    assert found.loose == {2}  # count(*) > 2; the LIMIT count is no value


@pytest.fixture(scope="module")
def real_schemas(shared_data: Path) -> dict[str, SpiderSchema]:
    return spider_schemas(read_rows(shared_data / "spider" / "tables.json"))


def fk_orphans(conn: sqlite3.Connection, schema: SpiderSchema, source: int, target: int) -> int:
    """Rows whose non-NULL foreign key value is missing from the referenced column."""
    s, t = schema.columns[source], schema.columns[target]
    return conn.execute(
        f"SELECT count(*) FROM {identifier(schema.tables[s.table])} "
        f"WHERE {identifier(s.name)} IS NOT NULL AND {identifier(s.name)} NOT IN "
        f"(SELECT {identifier(t.name)} FROM {identifier(schema.tables[t.table])})"
    ).fetchone()[0]


def test_every_real_schema_gets_valid_rows(real_schemas: dict[str, SpiderSchema]) -> None:
    assert len(real_schemas) == 166
    date = re.compile(r"\d{4}-\d\d-\d\d")
    for db_id, schema in real_schemas.items():
        scripts = variant_scripts(schema, Literals())
        assert scripts == variant_scripts(schema, Literals())  # seeded: the same every time
        assert len(set(scripts)) == VARIANTS
        for script in scripts:
            conn = sqlite3.connect(":memory:")
            # primary keys are declared, so a repeated key would raise here
            conn.executescript(create_tables(schema) + "\n" + script)
            first_targets: dict[int, int] = {}
            for source, target in schema.foreign_keys:
                tables = (schema.columns[source].table, schema.columns[target].table)
                if all(schema.created(t) for t in tables):
                    first_targets.setdefault(source, target)
            for source, target in first_targets.items():
                assert fk_orphans(conn, schema, source, target) == 0, (db_id, source, target)
            for t, table in enumerate(schema.tables):
                if not schema.created(t):
                    continue
                (n,) = conn.execute(f"SELECT count(*) FROM {identifier(table)}").fetchone()
                assert 1 <= n <= ROWS_PER_TABLE[1], (db_id, table)
                for c in schema.table_columns(t):
                    kind, name = schema.columns[c].kind, identifier(schema.columns[c].name)
                    values = conn.execute(
                        f"SELECT typeof({name}), {name} FROM {identifier(table)}"
                    ).fetchall()
                    if kind == "number" and c not in first_targets:  # a key may copy text
                        assert {v[0] for v in values} <= {"integer", "real", "null"}
                    elif kind == "time":
                        assert all(v[0] == "null" or date.fullmatch(v[1]) for v in values)
            conn.close()


SCHEMA_ROW = {
    "db_id": "shop",
    "table_names_original": ["parent_a", "parent_b", "child", "profile", "node"],
    "column_names_original": [
        [-1, "*"],
        [0, "id"],  # 1
        [0, "country"],  # 2
        [1, "id"],  # 3
        [1, "age"],  # 4
        [2, "pid"],  # 5: references both parents
        [2, "note"],  # 6
        [3, "person_id"],  # 7: primary key and foreign key (one-to-one)
        [4, "id"],  # 8
        [4, "parent"],  # 9: references its own table
    ],
    "column_types": [
        "text",
        "number",
        "text",
        "number",
        "number",
        "number",
        "text",
        "number",
        "number",
        "number",
    ],
    "primary_keys": [1, 3, 7, 8],
    "foreign_keys": [[5, 1], [5, 3], [7, 1], [9, 8]],
}


def test_keys_literals_and_affinity_on_a_hand_made_schema() -> None:
    schema = parse_schema(SCHEMA_ROW, Origin("tables.json", 1))
    literals = query_literals(
        [
            "SELECT id FROM parent_a WHERE country = 'France'",
            "SELECT id FROM parent_b WHERE age > 40",
        ],
        {"id", "country", "age", "pid", "note", "person_id", "parent"},
    )
    seen: set = set()
    for variant in range(10):
        rows = populate(schema, literals, variant)
        a_ids = {r[0] for r in rows[0]}
        b_ids = {r[0] for r in rows[1]}
        pids = {r[0] for r in rows[2]}
        assert pids <= (a_ids & b_ids if a_ids & b_ids else a_ids)
        persons = [r[0] for r in rows[3]]
        assert len(set(persons)) == len(persons) and set(persons) <= a_ids
        assert {r[1] for r in rows[4]} - {None} <= {r[0] for r in rows[4]}
        seen |= {r[1] for r in rows[0]} | {r[1] for r in rows[1]}
        conn = sqlite3.connect(":memory:")
        conn.executescript(create_tables(schema) + "\n" + insert_script(schema, rows))
        for t, table_rows in rows.items():
            stored_rows = conn.execute(f"SELECT * FROM {identifier(schema.tables[t])}").fetchall()
            assert sorted(map(tuple, table_rows), key=repr) == sorted(stored_rows, key=repr)
    assert "France" in seen and {39, 40, 41} <= seen  # literals and their neighbours


@pytest.mark.parametrize(
    ("kind", "sql_type"),
    [
        ("text", "TEXT"),
        ("others", "TEXT"),
        ("number", "NUMERIC"),
        ("time", "DATETIME"),
        ("boolean", "BOOLEAN"),
    ],
)
def test_stored_matches_sqlite_type_affinity(kind: str, sql_type: str) -> None:
    values = [None, 3, 2.5, 3.0, "3", "3.0", " 7 ", "2.5", "1e3", "abc", "2001-05-03", "T", -4]
    values += [1e20, "9223372036854775808", "0x10", "+5", ".5", "5.", 0.1 + 0.2, 1 / 3, 12.5]
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE t (i INTEGER, v {sql_type})")
    conn.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values)))
    got = [v for _, v in conn.execute("SELECT i, v FROM t ORDER BY i")]
    expected = [stored(kind, v) for v in values]
    assert [(type(v), v) for v in got] == [(type(v), v) for v in expected]
