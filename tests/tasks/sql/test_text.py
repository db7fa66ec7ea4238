"""Cleaning up generated SQL and comparing SQL text."""

from __future__ import annotations

import time

import pytest

from molf.tasks.sql import text as sql_text
from molf.tasks.sql.text import (
    fold_text,
    is_valid_sql,
    normalize_sql,
    parse_trees,
    postprocess_sql,
    sql_exact_match,
)

DEEP = "SELECT " + "(" * 3000 + "1" + ")" * 3000  # sqlglot 30 raises RecursionError on it
ADVERSARIAL = [
    "CREATE a SQL query that RETURNS the names of the singers",
    "CREATE a SQL query that RETURNS ...",
    "DROP TABLE singer",
    "CREATE TABLE x (a INT)",
    "hello world this is not sql at all",
    "SELECT 'unbalanced FROM singer",
    'SELECT "unbalanced FROM singer',
    "SELECT name FROM singer WHERE name = 'a''",
    "SELECT 1; SELECT 2; DROP TABLE singer",
    "ATTACH DATABASE 'x.db' AS x",
    "PRAGMA table_info(singer)",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    DEEP,
    "SELECT " + "NOT " * 5000 + "1",
    "x " * 50_000,  # 100k characters
    "blah blah\n" * 10_000,  # 100k characters over 10k lines
    "```" * 10_000,
    "SELECT '\x00'",
    "",
    ";;;",
    "]]]]'\"`",
    # a degenerate generation: sqlglot's parse time doubles with each JOIN without ON
    "SELECT name FROM singer " + "JOIN concert " * 30,
    "SELECT a FROM t " + "JOIN u JOIN v USING (x) " * 12 + "\n" + "JOIN w\n" * 30,
]


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
    assert normalize_sql("select  Name\nFROM Singer ;") == "SELECT name FROM singer"
    assert normalize_sql("SELECT T1.a FROM x AS T1") == "SELECT t1.a FROM x AS t1"
    assert normalize_sql('SELECT "Home Town" FROM "Singer"', {"home town"}) == (
        'SELECT "home town" FROM singer'
    )
    # not SQL: whitespace folded, case folded outside quotes only
    assert normalize_sql(" No  Idea; ") == "no idea"
    assert fold_text(" Give  ME 'Texas' and \"Ohio\" ; ") == "give me 'Texas' and \"Ohio\""
    assert fold_text("An 'unclosed Quote") == "an 'unclosed Quote"


def test_string_literals_keep_their_case() -> None:
    assert normalize_sql("select * from T where S = 'Texas'") == (
        "SELECT * FROM t WHERE s = 'Texas'"
    )
    assert not sql_exact_match(
        "SELECT a FROM t WHERE s = 'texas'", "SELECT a FROM t WHERE s = 'Texas'"
    )
    assert sql_exact_match("select A from T where S = 'Texas'", "SELECT a FROM t WHERE s = 'Texas'")


def test_double_quoted_names_resolve_like_sqlite() -> None:
    # Spider writes strings in double quotes; SQLite reads "x" as a string unless x is a column
    columns = {"name", "home town"}
    gold = 'SELECT name FROM singer WHERE name = "Texas"'
    assert sql_exact_match("SELECT name FROM singer WHERE name = 'Texas'", gold, columns)
    assert not sql_exact_match("SELECT name FROM singer WHERE name = 'texas'", gold, columns)
    assert sql_exact_match('SELECT "NAME" FROM singer WHERE name = "Texas"', gold, columns)
    assert sql_exact_match(
        'SELECT "Home Town" FROM singer', 'SELECT "home town" FROM singer', columns
    )
    # without the column names a double-quoted bare name keeps its case (it may be a string)
    assert not sql_exact_match(
        'SELECT a FROM t WHERE b = "texas"', 'SELECT a FROM t WHERE b = "Texas"'
    )


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_adversarial_text_never_raises_and_is_fast(text: str) -> None:
    start = time.monotonic()
    cleaned = postprocess_sql(text)
    assert isinstance(is_valid_sql(cleaned), bool)
    assert isinstance(sql_exact_match(cleaned, "SELECT name FROM singer", {"name"}), bool)
    assert isinstance(sql_exact_match(text, text), bool)
    assert time.monotonic() - start < 10.0


def test_sqlglot_failures_are_unparsable_not_errors() -> None:
    assert parse_trees(DEEP) is None and not is_valid_sql(DEEP)
    assert normalize_sql(DEEP).startswith("select ((((")
    long = "SELECT a FROM t WHERE " + " OR ".join(f"a = {i}" for i in range(3000))
    assert len(long) > sql_text.MAX_PARSE_CHARS and parse_trees(long) is None
    assert parse_trees("SELECT 1; SELECT 2") is not None and not is_valid_sql("SELECT 1; SELECT 2")
    assert parse_trees("") is None and parse_trees(";") is None


def test_joins_without_on_are_counted_and_bounded() -> None:
    assert sql_text.bare_joins("SELECT * FROM a JOIN b ON x JOIN c USING (y) JOIN d") == 1
    assert sql_text.bare_joins("SELECT 'join join' FROM a JOIN b ON a.x = b.x") == 0
    assert sql_text.bare_joins("SELECT * FROM a JOIN b JOIN c ON x = y") == 1
    bare = "SELECT * FROM a " + " ".join(f"JOIN t{i}" for i in range(sql_text.MAX_BARE_JOINS))
    assert is_valid_sql(bare)  # up to the limit sqlglot still reads them
    assert parse_trees(bare + " JOIN one_more") is None
    with_on = "SELECT * FROM a " + " ".join(f"JOIN t{i} ON a.x = t{i}.x" for i in range(40))
    assert is_valid_sql(with_on)  # joins with ON cost sqlglot linear time: no limit


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
        ("SELECT a FROM t WHERE b = 'x'", "SELECT a FROM t WHERE b = 'X'", False),
        ("SELECT a FROM t WHERE b LIKE '%Ab%'", "select A from T where B like '%Ab%'", True),
    ],
)
def test_sql_exact_match(predicted: str, gold: str, match: bool) -> None:
    assert sql_exact_match(predicted, gold) is match
