"""Cleaning up generated SQL and comparing SQL text."""

from __future__ import annotations

import pytest

from molf.tasks.sql_text import is_valid_sql, normalize_sql, postprocess_sql, sql_exact_match


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" SELECT name FROM singer;", "SELECT name FROM singer"),
        ("SELECT name FROM singer", "SELECT name FROM singer"),
        ("```sql\nSELECT name\nFROM singer;\n```\nThis lists names.", "SELECT name\nFROM singer"),
        ("```SQL\nSELECT 1\n```", "SELECT 1"),
        ("```\nSELECT 1", "SELECT 1"),  # fence never closed
        ("SELECT a FROM t```", "SELECT a FROM t"),  # only a closing fence
        ("SELECT a FROM t\n```\nThis returns a.", "SELECT a FROM t"),
        ("Try this:\n```sql\nSELECT 3", "SELECT 3"),
        ("Here you go:\n```sqlite\nSELECT 2;\n```", "SELECT 2"),
        ("SQL: SELECT a FROM t", "SELECT a FROM t"),
        (" sql:SELECT a FROM t; SELECT b FROM u;", "SELECT a FROM t"),
        ("SELECT a FROM t WHERE b = 'x;y'; DROP TABLE t", "SELECT a FROM t WHERE b = 'x;y'"),
        ('SELECT "a;b" FROM t; junk', 'SELECT "a;b" FROM t'),
        ("SELECT a\nFROM t\nThis query returns every a.", "SELECT a\nFROM t"),
        ("SELECT a FROM t\n\nExplanation: it selects a", "SELECT a FROM t"),
        ("I do not know", "I do not know"),
        ("", ""),
    ],
)
def test_postprocess_sql(generated: str, expected: str) -> None:
    assert postprocess_sql(generated) == expected


@pytest.mark.parametrize(
    ("sql", "valid"),
    [
        ("SELECT count(*) FROM singer", True),
        ("select a from t where b in (select c from u)", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", True),
        ("SELECT 1 UNION SELECT 2", True),
        ("INSERT INTO t VALUES (1)", True),
        ("DELETE FROM t WHERE a = 1", True),
        ("CREATE TABLE t (a INT)", True),
        ("", False),
        ("hello", False),  # sqlglot reads a bare word as a column, not a statement
        ("this is not sql", False),
        ("SELECT FROM WHERE", False),
        ("SELECT 1; SELECT 2", False),  # two statements
    ],
)
def test_is_valid_sql(sql: str, valid: bool) -> None:
    assert is_valid_sql(sql) is valid


def test_normalize_sql_folds_case_spacing_and_the_final_semicolon() -> None:
    assert normalize_sql("select  Name\nFROM Singer ;") == "select name from singer"
    assert normalize_sql("SELECT T1.a FROM x AS T1") == "select t1.a from x as t1"
    # not SQL: whitespace and case folded only
    assert normalize_sql(" No  Idea; ") == "no idea"


@pytest.mark.parametrize(
    ("predicted", "gold", "match"),
    [
        ("SELECT count(*) FROM singer", "select COUNT(*) from singer;", True),
        ("SELECT name FROM singer WHERE age>20", "SELECT name FROM singer WHERE age > 20", True),
        ("SELECT name ,  age FROM singer", "SELECT name, age FROM singer", True),
        ("SELECT name FROM singer", "SELECT age FROM singer", False),
        ("SELECT name FROM singer WHERE age > 21", "SELECT name FROM singer WHERE age > 20", False),
        ("no idea", "No  idea", True),
        ("no idea", "SELECT 1", False),
    ],
)
def test_sql_exact_match(predicted: str, gold: str, match: bool) -> None:
    assert sql_exact_match(predicted, gold) is match
