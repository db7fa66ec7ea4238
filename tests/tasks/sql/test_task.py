"""Text-to-SQL: SQLite execution, metrics, Spider schemas, splits, populated databases,
robustness to adversarial predictions, evaluation."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import get_task
from molf.tasks.base import DataPath
from molf.tasks.scoring import generate
from molf.tasks.sources import Origin, hash_fraction
from molf.tasks.sql import sqlite
from molf.tasks.sql import task as sql_task
from molf.tasks.sql.populate import VARIANTS
from molf.tasks.sql.score import judge_all, record_scripts, sql_metrics
from molf.tasks.sql.spider import schema_ddl
from molf.tasks.sql.split import database_sides, question_side
from molf.tasks.sql.sqlite import execute, has_rows, outcomes_agree
from molf.tasks.sql.task import (
    SqlRecord,
    check_record,
    parse_gretel_row,
    parse_spider_row,
    sql_example,
    sql_prompt,
)
from molf.tasks.sql.text import postprocess_sql

from ..helpers import SINGERS, write_json, write_jsonl

FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


def record(
    query: str, context: str = SINGERS, line: int = 1, variants: tuple[str, ...] = ()
) -> SqlRecord:
    return SqlRecord("a question", context, query, Origin("data.jsonl", line), None, variants)


def test_execute_keeps_row_order_and_agreement_ignores_it_unless_asked() -> None:
    by_name = execute(SINGERS, "SELECT name FROM singer ORDER BY name", "r")
    by_age = execute(SINGERS, "SELECT name FROM singer ORDER BY age", "r")
    assert by_name is not None and by_age is not None
    assert by_name.rows == (("Ann",), ("Bob",), ("Cy",)) and by_age.rows[0] == ("Bob",)
    assert outcomes_agree(by_age, by_name, ordered=False)
    assert not outcomes_agree(by_age, by_name, ordered=True)
    doubled = execute(SINGERS, "SELECT name FROM singer UNION ALL SELECT 'Ann'", "r")
    assert doubled is not None and not outcomes_agree(doubled, by_name, ordered=False)


def test_execute_sees_what_a_statement_changed() -> None:
    deleted = execute(SINGERS, "DELETE FROM singer WHERE age < 25", "r")
    assert deleted is not None and not deleted.rows and deleted.tables is not None
    assert sorted(deleted.tables["singer"]) == [(1, "Ann", 30), (3, "Cy", 40)]
    other = execute(SINGERS, "DELETE FROM singer WHERE age < 35", "r")
    assert other is not None and not outcomes_agree(other, deleted, ordered=False)
    selected = execute(SINGERS, "SELECT 1 FROM singer WHERE 0", "r")
    assert selected is not None and selected.tables is None  # nothing changed
    dropped = execute(SINGERS, "DROP TABLE singer", "r")
    assert dropped is not None and dropped.tables == {}


@pytest.mark.parametrize(
    "sql", ["SELECT nope FROM singer", "", "SELECT 1; SELECT 2", "garbage", "SELECT '\x00"]
)
def test_failing_statements_give_none(sql: str) -> None:
    assert execute(SINGERS, sql, "r") is None


def test_runaway_query_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite, "QUERY_SECONDS", 0.2)
    assert execute(SINGERS, FOREVER, "r") is None


def test_too_many_rows_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite, "MAX_RESULT_ROWS", 8)
    assert execute(SINGERS, "SELECT * FROM singer a, singer b", "r") is None  # 9 rows
    assert execute(SINGERS, "SELECT * FROM singer a, singer b LIMIT 8", "r") is not None


def test_generated_sql_cannot_write_files(tmp_path: Path) -> None:
    for sql in (
        f"ATTACH DATABASE '{tmp_path / 'a.db'}' AS a",
        f"VACUUM INTO '{tmp_path / 'b.db'}'",
    ):
        assert execute(SINGERS, sql, "r") is None
    assert list(tmp_path.iterdir()) == []


def test_context_that_does_not_run_names_the_record() -> None:
    with pytest.raises(MolfError, match=r"data\.jsonl:7: the SQL context does not execute"):
        sql_metrics([record("SELECT 1", "CREATE TABLE (", line=7)], ["SELECT 1"])


def test_gold_query_that_does_not_run_names_the_record() -> None:
    with pytest.raises(MolfError, match=r"data\.jsonl:4: the gold query does not execute"):
        sql_metrics([record("SELECT nope FROM singer", line=4)], ["SELECT 1"])


def test_has_rows() -> None:
    assert has_rows(SINGERS)
    assert not has_rows("CREATE TABLE t (a INT);")


def test_sql_metrics_hand_computed() -> None:
    records = [
        record("SELECT name FROM singer WHERE age > 25 ORDER BY name"),
        record("SELECT count(*) FROM singer"),
        record("DELETE FROM singer WHERE age < 25"),
        record("SELECT name FROM singer WHERE id = 1"),
        record("SELECT max(age) FROM singer"),
        record("SELECT a FROM t", context="CREATE TABLE t (a INT);"),  # schema only
        record("SELECT name FROM singer WHERE id = 5"),  # returns nothing
    ]
    predictions = [
        "SELECT name FROM singer WHERE age >= 30 ORDER BY name",  # same rows, different text
        "select COUNT(*) from singer",  # same text up to case
        "DELETE FROM singer WHERE age <= 30",  # runs, deletes one row too many
        "SELECT nme FROM singer",  # parses, does not run
        "SELECT 'the oldest",  # sqlglot cannot read it
        "SELECT a FROM t",  # exact, but no data to check execution on
        "SELECT name FROM singer WHERE id = 6",  # "agrees" with an empty gold result
    ]
    assert sql_metrics(records, predictions) == pytest.approx(
        {
            "exact_match": 2 / 7,
            "valid_sql": 6 / 7,
            "unparsable": 1 / 7,
            "executes": 5 / 7,
            "execution_accuracy": 3 / 6,
            "execution_coverage": 6 / 7,
            "nonempty_gold": 5 / 6,
        }
    )


def test_schema_only_records_get_no_execution_accuracy() -> None:
    records = [record("SELECT a FROM t", context="CREATE TABLE t (a INT);")] * 2
    assert sql_metrics(records, ["SELECT a FROM t", "SELECT b FROM t"]) == {
        "exact_match": 0.5,
        "valid_sql": 1.0,
        "unparsable": 0.0,
        "executes": 0.5,
    }


# one schema, two sets of rows: a prediction must agree with the gold query on both
TWO_VARIANTS = ("INSERT INTO t VALUES (1, 'x');", "INSERT INTO t VALUES (1, 'x'), (5, 'y');")


@pytest.mark.parametrize(
    ("gold", "predicted", "match"),
    [
        ("SELECT a FROM t WHERE a < 3", "SELECT a FROM t", False),  # agrees on the first only
        ("SELECT a FROM t WHERE a < 3", "SELECT a FROM t WHERE a <= 2", True),
        ("SELECT a FROM t WHERE a < 3", "SELECT a FROM t WHERE b = 'x'", True),
        ("SELECT a FROM t ORDER BY a DESC", "SELECT a FROM t ORDER BY a", False),  # gold sorts
        ("SELECT a FROM t", "SELECT a FROM t ORDER BY a DESC", True),  # gold does not
        ("SELECT a FROM t UNION SELECT 9 ORDER BY 1", "SELECT 9 UNION SELECT a FROM t", True),
        ("SELECT a, b FROM t", "SELECT b, a FROM t", False),  # columns in order
        ("SELECT count(*) FROM t", "SELECT count(a) FROM t", True),
    ],
)
def test_execution_match_needs_every_variant(gold: str, predicted: str, match: bool) -> None:
    r = record(gold, "CREATE TABLE t (a INT, b TEXT);", variants=TWO_VARIANTS)
    assert record_scripts(r) == tuple(f"{r.context}\n{v}" for v in TWO_VARIANTS)
    (judgement,) = judge_all([r], [predicted])
    assert judgement.execution_match is match and judgement.executes


def test_adversarial_predictions_are_scored_wrong_and_counted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sqlite, "QUERY_SECONDS", 0.3)
    schema = "CREATE TABLE singer (id INT, name TEXT, age INT);"
    rows = (
        "INSERT INTO singer VALUES (1, 'Ann', 30), (2, 'Bob', 20);",
        "INSERT INTO singer VALUES (3, 'Cy', 40);",
    )
    cases = {  # prediction: (parses, executes)
        "DROP TABLE singer": (True, True),
        "CREATE TABLE x (a INT)": (True, True),
        "CREATE a SQL query that RETURNS the names of the singers": (True, False),
        "I do not know the answer": (False, False),
        "SELECT 'unbalanced FROM singer": (False, False),
        "SELECT name FROM singer; DROP TABLE singer": (True, False),
        f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x": (True, False),
        "PRAGMA table_info(singer)": (True, True),
        FOREVER: (True, False),
        "SELECT " + "(" * 80 + "1" + ")" * 80: (False, True),  # sqlglot: RecursionError
        "x " * 50_000: (False, False),
        "": (False, False),
    }
    gold = "SELECT name FROM singer WHERE age > 25"
    for context, variants in ((SINGERS, ()), (schema, rows)):
        records = [record(gold, context, variants=variants)] * (len(cases) + 1)
        predictions = [*cases, gold]
        judgements = judge_all(records, predictions)
        for prediction, judgement in zip(cases, judgements[:-1], strict=True):
            assert (judgement.parses, judgement.executes) == cases[prediction], prediction[:40]
            assert not judgement.exact_match and judgement.execution_match is False
        # each prediction ran on its own copy: the DROP TABLE before did not reach this one
        assert judgements[-1].exact_match and judgements[-1].execution_match
        metrics = sql_metrics(records, predictions)
        assert metrics["unparsable"] == pytest.approx(5 / len(predictions))
        assert metrics["execution_accuracy"] == pytest.approx(1 / len(predictions))
    assert list(tmp_path.iterdir()) == []


TABLES = {
    "db_id": "music",
    "table_names_original": ["artist", "song", "sqlite_sequence"],
    "column_names_original": [
        [-1, "*"],
        [0, "Artist_ID"],
        [0, "Home Town"],
        [1, "Artist_ID"],
        [1, "From"],
        [1, "Released"],
        [2, "name"],
    ],
    "column_types": ["text", "number", "text", "number", "text", "time", "text"],
    "primary_keys": [1, [3, 4]],
    "foreign_keys": [[3, 1]],
}


def test_spider_schema_becomes_create_table_statements() -> None:
    ddl = schema_ddl(TABLES, Origin("tables.json", 1))
    assert ddl == (
        'CREATE TABLE artist (Artist_ID NUMERIC, "Home Town" TEXT, PRIMARY KEY (Artist_ID));\n'
        'CREATE TABLE song (Artist_ID NUMERIC, "From" TEXT, Released DATETIME, '
        'PRIMARY KEY (Artist_ID, "From"), FOREIGN KEY (Artist_ID) REFERENCES artist (Artist_ID));'
    )
    assert not has_rows(ddl)  # it runs, and it is empty


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"column_types": ["text"]}, "column_types"),
        (
            {"column_types": ["text", "number", "text", "number", "text", "blob", "text"]},
            "column_types",
        ),
        (
            {"column_names_original": [[-1, "*"], [5, "x"]], "column_types": ["text", "text"]},
            "column_names_original",
        ),
        ({"primary_keys": [99]}, "primary_keys"),
        ({"foreign_keys": [[3]]}, "foreign_keys"),
        ({"table_names_original": []}, "table_names_original"),
    ],
)
def test_malformed_schema_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(DataError, match=rf"tables\.json:3: field '{field}'"):
        schema_ddl({**TABLES, **change}, Origin("tables.json", 3))


def test_both_layouts_make_the_same_kind_of_example() -> None:
    gretel = parse_gretel_row(
        {
            "sql_prompt": "How many singers?",
            "sql_context": SINGERS,
            "sql": "SELECT count(*) FROM singer;",
            "domain": "music",
            "sql_complexity": "basic",
        },
        Origin("hub:gretelai/synthetic_text_to_sql[train]", 1),
    )
    spider = parse_spider_row(
        {"db_id": "music", "question": "How many artists?", "query": "SELECT count(*) FROM artist"},
        Origin("dev.json", 1),
        {"music": "CREATE TABLE artist (Artist_ID NUMERIC);"},
    )
    assert sql_example(gretel).prompt == f"{SINGERS}\nQuestion: How many singers?\nSQL:"
    assert sql_example(gretel).completion == " SELECT count(*) FROM singer;"
    assert sql_example(spider).prompt.endswith("NUMERIC);\nQuestion: How many artists?\nSQL:")
    assert spider.db_id == "music" and gretel.db_id is None


def test_check_record_names_file_line_and_layout_field() -> None:
    origin = Origin("data.jsonl", 5)
    bad_context = {"sql_prompt": "q", "sql_context": "CREATE TABLE (", "sql": "SELECT 1"}
    with pytest.raises(DataError, match=r"data\.jsonl:5: field 'sql_context': the context does"):
        check_record(parse_gretel_row(bad_context, origin))
    bad_gold = {"sql_prompt": "q", "sql_context": SINGERS, "sql": "SELECT x FROM nowhere"}
    with pytest.raises(DataError, match=r"data\.jsonl:5: field 'sql': the gold query"):
        check_record(parse_gretel_row(bad_gold, origin))
    spider = {"db_id": "music", "question": "q", "query": "SELECT nope FROM artist"}
    with pytest.raises(DataError, match=r"dev\.json:5: field 'query'"):
        check_record(
            parse_spider_row(spider, Origin("dev.json", 5), {"music": "CREATE TABLE artist (a);"})
        )
    with pytest.raises(DataError, match=r"dev\.json:5: field 'db_id': database 'music' is not"):
        parse_spider_row(spider, Origin("dev.json", 5), {})
    # runs on the empty schema, fails once there are rows: json() of a non-JSON value
    rows = SqlRecord("q", "CREATE TABLE t (a TEXT);", "SELECT json(a) FROM t", origin, "db")
    assert check_record(rows) is rows
    variants = ("INSERT INTO t VALUES ('[1]');", "INSERT INTO t VALUES ('x');")
    with pytest.raises(DataError, match=r"field 'query': .* on generated rows \(variant 1\)"):
        check_record(dataclasses.replace(rows, variants=variants))


def gretel_rows(n: int, context: str = SINGERS) -> list[dict]:
    return [
        {
            "sql_prompt": f"Question {i}?",
            "sql_context": context,
            "sql": f"SELECT name FROM singer WHERE id = {i};",
        }
        for i in range(n)
    ]


def test_hub_layout_file_is_split_by_question_hash(tmp_path: Path) -> None:
    rows = gretel_rows(40)
    path = write_jsonl(tmp_path / "sql.jsonl", rows)
    expected = {"train": set(), "val": set(), "test": set()}
    for row in rows:  # the definition: train below 0.6, val below 0.8, test above
        h = hash_fraction(row["sql_prompt"])
        expected["train" if h < 0.6 else "val" if h < 0.8 else "test"].add(row["sql_prompt"])
    for split in ("val", "test"):
        for seed in (0, 1):
            data = get_task("sql").load(str(path), seed=seed, split=split)
            assert {r.question for r in data.eval} == expected[split]
            assert {e.prompt.split("Question: ")[1][:-5] for e in data.train} == expected["train"]
    bad = write_jsonl(tmp_path / "bad.jsonl", gretel_rows(40, context="CREATE TABLE ("))
    with pytest.raises(DataError, match=r"bad\.jsonl:\d+: field 'sql_context'"):
        get_task("sql").load(str(bad))
    with pytest.raises(MolfError, match="no databases to split by"):
        get_task("sql").load(f"{path}#by-database")


DBS = ("a", "b", "c", "d", "e")


def spider_files(directory: Path) -> Path:
    tables = [
        {**TABLES, "db_id": db, "table_names_original": [f"{db}_t", "other", "sqlite_sequence"]}
        for db in DBS
    ]
    write_json(directory / "tables.json", tables)
    questions = [
        {
            "db_id": db,
            "question": f"Q{i} on {db}",
            "query": f"SELECT count(*) FROM {db}_t WHERE Artist_ID > {i}",
        }
        for db in DBS
        for i in range(3)
    ]
    return write_json(directory / "dev.json", questions)


def test_spider_split_keeps_each_database_on_one_side(tmp_path: Path) -> None:
    spider_files(tmp_path)
    sides = database_sides(dict.fromkeys(DBS, 3))
    assert Counter(sides.values()) == {"train": 1, "val": 2, "test": 2}  # at most (5 - 1) // 2
    loaded = {
        (split, seed): get_task("sql").load(str(tmp_path), seed=seed, split=split)
        for split in ("val", "test")
        for seed in (0, 3)
    }
    for (split, _), data in loaded.items():
        assert {r.db_id for r in data.eval} == {db for db in DBS if sides[db] == split}
        assert len(data.eval) == 6 and len(data.train) == 3
        assert all(len(r.variants) == VARIANTS for r in data.eval)
        train_dbs = {db for db in DBS if f" on {db}\n" in " ".join(e.prompt for e in data.train)}
        assert train_dbs == {db for db in DBS if sides[db] == "train"}
        assert "split by database: 1 train / 2 val / 2 test databases" in data.source
    assert loaded[("test", 0)].eval == loaded[("test", 3)].eval  # --seed does not move test


def test_spider_split_by_question_mode(tmp_path: Path) -> None:
    spider_files(tmp_path)
    for split in ("val", "test"):
        data = get_task("sql").load(f"{tmp_path}#by-question", split=split)
        expected = {f"Q{i} on {db}" for db in DBS for i in range(3)}
        assert {r.question for r in data.eval} == {q for q in expected if question_side(q) == split}
        assert len(data.train) == sum(question_side(q) == "train" for q in expected)
    with pytest.raises(MolfError, match="unknown split mode 'by-row'"):
        get_task("sql").load(f"{tmp_path}#by-row")
    with pytest.raises(MolfError, match="split must be one of val, test"):
        get_task("sql").load(str(tmp_path), split="train")


def test_data_path_is_spiders_directory_and_split_mode(tmp_path: Path) -> None:
    sql = get_task("sql")
    assert sql.data_path(f"{tmp_path}#by-question") == DataPath(tmp_path, "by-question")
    assert sql.data_path(str(tmp_path)) == DataPath(tmp_path)
    assert sql.data_path("~/spider#by-database") == DataPath(Path.home() / "spider", "by-database")
    odd = tmp_path / "a#by-question"
    odd.mkdir()
    assert sql.data_path(str(odd)) == DataPath(odd)  # an existing path is taken whole
    with pytest.raises(MolfError, match="unknown split mode 'by-row'"):
        sql.data_path(f"{tmp_path}#by-row")


def test_spider_needs_tables_json(tmp_path: Path) -> None:
    spider_files(tmp_path)
    (tmp_path / "tables.json").unlink()
    with pytest.raises(MolfError, match="tables.json beside them"):
        get_task("sql").load(str(tmp_path))


@pytest.fixture(scope="module")
def spider_loads(shared_data: Path) -> dict:
    """The real Spider dev set loaded in both modes and both held-out splits."""
    spider = shared_data / "spider"
    return {
        (mode, split): get_task("sql").load(f"{spider}{mode}", split=split)
        for mode in ("", "#by-question")
        for split in ("val", "test")
    }


def test_real_spider_splits(shared_data: Path, spider_loads: dict) -> None:
    questions = json.loads((shared_data / "spider" / "dev.json").read_text())
    for mode in ("", "#by-question"):
        val, test = spider_loads[(mode, "val")], spider_loads[(mode, "test")]
        assert val.train == test.train
        assert len(val.train) + len(val.eval) + len(test.eval) == len(questions) == 1034
        held = {sql_prompt(r) for r in val.eval} | {sql_prompt(r) for r in test.eval}
        assert not held & {e.prompt for e in val.train}
        assert all(len(r.variants) == VARIANTS for r in val.eval + test.eval)
    by_db = {s: {r.db_id for r in spider_loads[("", s)].eval} for s in ("val", "test")}
    train_dbs = {e.prompt.split("\nQuestion:")[0] for e in spider_loads[("", "val")].train}
    assert not by_db["val"] & by_db["test"]
    assert not train_dbs & {r.context for s in ("val", "test") for r in spider_loads[("", s)].eval}
    # each held-out split: at least 3 databases and 15% of the questions
    for split in ("val", "test"):
        assert len(by_db[split]) >= 3 and len(spider_loads[("", split)].eval) >= 0.15 * 1034
    assert (
        "split by database: 11 train / 5 val / 4 test databases" in spider_loads[("", "val")].source
    )


def test_real_spider_execution_accuracy_against_direct_sqlite(spider_loads: dict) -> None:
    """Judged against a plain re-implementation: each prediction (the gold query of another
    question on the same database) run with sqlite3 on each variant and compared."""
    records = spider_loads[("", "test")].eval
    rng = random.Random(0)
    sample = rng.sample(records, 60)
    predictions = [
        rng.choice([o.query for o in records if o.db_id == r.db_id]) for r in sample[:40]
    ] + [r.query for r in sample[40:]]

    def run(script: str, sql: str) -> list | None:
        conn = sqlite3.connect(":memory:")
        try:
            conn.executescript(script)
            return conn.execute(sql).fetchall()
        except sqlite3.Error:
            return None
        finally:
            conn.close()

    def outer_order_by(sql: str) -> bool:
        while re.search(r"\([^()]*\)", sql):
            sql = re.sub(r"\([^()]*\)", "", sql)
        return re.search(r"\border\s+by\b", sql, re.I) is not None

    expected = []
    for r, p in zip(sample, predictions, strict=True):
        agree, ordered = True, outer_order_by(r.query)
        for rows in r.variants:
            script = f"{r.context}\n{rows}"
            got, gold = run(script, p), run(script, r.query)
            if got is None or (got != gold if ordered else Counter(got) != Counter(gold)):
                agree = False
        expected.append(agree)
    judgements = judge_all(sample, predictions)
    assert [j.execution_match for j in judgements] == expected
    assert all(j.execution_match and j.exact_match for j in judgements[40:])
    assert 0 < sum(expected[:40]) < 40


def test_real_spider_gold_queries_mostly_return_rows(spider_loads: dict) -> None:
    records = [r for key, data in spider_loads.items() if key[0] == "" for r in data.eval]
    metrics = sql_metrics(records, [r.query for r in records])
    assert metrics["exact_match"] == metrics["execution_accuracy"] == 1.0
    assert metrics["nonempty_gold"] > 0.85  # measured 0.9+ with query literals in the rows


def test_evaluate_end_to_end_with_predictions(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    task = get_task("sql")
    records = [record(r["sql"], line=i) for i, r in enumerate(gretel_rows(3), 1)]
    records.append(record("SELECT a FROM t", context="CREATE TABLE t (a INT);"))
    predictions: list[dict] = []
    metrics = task.evaluate(
        model, tokenizer, records, batch_size=2, max_new_tokens=12, predictions=predictions
    )
    assert set(metrics) == {
        "exact_match",
        "valid_sql",
        "unparsable",
        "executes",
        "execution_accuracy",
        "execution_coverage",
        "nonempty_gold",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["execution_coverage"] == 0.75
    generated = generate(model, tokenizer, [sql_example(r).prompt for r in records], 12)
    assert metrics == sql_metrics(records, [postprocess_sql(g) for g in generated])
    assert [p["output"] for p in predictions] == generated
    assert [p["sql"] for p in predictions] == [postprocess_sql(g) for g in generated]
    assert [p["reference"] for p in predictions] == [r.query for r in records]
    assert [p["prompt"] for p in predictions] == [sql_prompt(r) for r in records]
    assert sum(p["correct"] for p in predictions) / len(records) == metrics["exact_match"]
    assert predictions[-1]["execution_match"] is None  # schema only
    assert all(
        set(p) == {"prompt", "reference", "output", "sql", "correct", "executes", "execution_match"}
        for p in predictions
    )
    assert task.baselines(records) == {}
    spider = task.load(str(spider_files(tmp_path)), max_eval_samples=2).eval
    spider_predictions: list[dict] = []
    spider_metrics = task.evaluate(
        model, tokenizer, spider, max_new_tokens=8, predictions=spider_predictions
    )
    assert spider_metrics["execution_coverage"] == 1.0
    assert all(isinstance(p["execution_match"], bool) for p in spider_predictions)


def test_hub_val_and_test_are_hash_halves_of_the_hub_test_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = gretel_rows(30)
    bad = {**rows[0], "sql_prompt": "Broken?", "sql_context": "CREATE TABLE ("}

    def hub_rows(dataset_id: str, split: str) -> list:  # the download, replaced by rows
        given = rows[:5] if split == "train" else [*rows, bad]
        return [(Origin(f"hub:{dataset_id}[{split}]", n), r) for n, r in enumerate(given, 1)]

    monkeypatch.setattr(sql_task, "hub_rows", hub_rows)
    val, test = (get_task("sql").load(None, split=s) for s in ("val", "test"))
    assert len(val.train) == len(test.train) == 5
    halves = {s: {r.question for r in d.eval} for s, d in (("val", val), ("test", test))}
    assert halves["val"] and halves["test"] and not halves["val"] & halves["test"]
    assert halves["val"] | halves["test"] == {r["sql_prompt"] for r in rows}
    assert halves["val"] == {q for q in halves["val"] | halves["test"] if hash_fraction(q) < 0.5}
    bad_side = "val" if hash_fraction("Broken?") < 0.5 else "test"
    assert "skipped 1 malformed rows" in (val if bad_side == "val" else test).source
