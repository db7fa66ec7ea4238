"""Text-to-SQL: SQLite execution, metrics, Spider schemas, both layouts, evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import get_task, sql_exec
from molf.tasks.scoring import generate
from molf.tasks.sources import Origin
from molf.tasks.spider import schema_ddl
from molf.tasks.sql import (
    SqlRecord,
    check_record,
    parse_gretel_row,
    parse_spider_row,
    sql_example,
    sql_metrics,
)
from molf.tasks.sql_exec import execute, has_rows
from molf.tasks.sql_text import postprocess_sql

from .helpers import SINGERS, write_json, write_jsonl


def record(query: str, context: str = SINGERS, line: int = 1) -> SqlRecord:
    return SqlRecord("a question", context, query, Origin("data.jsonl", line))


def test_execute_compares_result_multisets_not_order() -> None:
    by_name = execute(SINGERS, "SELECT name FROM singer ORDER BY name", "r")
    by_age = execute(SINGERS, "SELECT name FROM singer ORDER BY age", "r")
    assert by_name == by_age and by_name is not None
    doubled = execute(SINGERS, "SELECT name FROM singer UNION ALL SELECT 'Ann'", "r")
    assert doubled is not None and doubled.rows != by_name.rows


def test_execute_sees_what_a_statement_changed() -> None:
    deleted = execute(SINGERS, "DELETE FROM singer WHERE age < 25", "r")
    assert deleted is not None and not deleted.rows
    assert sorted(deleted.tables["singer"]) == [(1, "Ann", 30), (3, "Cy", 40)]
    assert execute(SINGERS, "DELETE FROM singer WHERE age < 35", "r") != deleted


@pytest.mark.parametrize("sql", ["SELECT nope FROM singer", "", "SELECT 1; SELECT 2", "garbage"])
def test_failing_statements_give_none(sql: str) -> None:
    assert execute(SINGERS, sql, "r") is None


def test_runaway_query_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql_exec, "QUERY_SECONDS", 0.2)
    forever = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    )
    assert execute(SINGERS, forever, "r") is None


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
    ]
    predictions = [
        "SELECT name FROM singer WHERE age >= 30",  # same rows, different text
        "select COUNT(*) from singer",  # same text up to case
        "DELETE FROM singer WHERE age <= 30",  # runs, deletes one row too many
        "SELECT nme FROM singer",  # parses, does not run
        "the oldest",  # not SQL
        "SELECT a FROM t",  # exact, but no data to check execution on
    ]
    assert sql_metrics(records, predictions) == pytest.approx(
        {
            "exact_match": 2 / 6,
            "valid_sql": 5 / 6,
            "executes": 4 / 6,
            "execution_accuracy": 2 / 5,
            "execution_coverage": 5 / 6,
        }
    )


def test_schema_only_records_get_no_execution_accuracy() -> None:
    records = [record("SELECT a FROM t", context="CREATE TABLE t (a INT);")] * 2
    assert sql_metrics(records, ["SELECT a FROM t", "SELECT b FROM t"]) == {
        "exact_match": 0.5,
        "valid_sql": 1.0,
        "executes": 0.5,
    }


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


def gretel_rows(n: int, context: str = SINGERS) -> list[dict]:
    return [
        {
            "sql_prompt": f"Question {i}?",
            "sql_context": context,
            "sql": f"SELECT name FROM singer WHERE id = {i};",
        }
        for i in range(n)
    ]


def test_hub_layout_file_is_split_by_row_and_eval_rows_are_checked(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sql.jsonl", gretel_rows(10))
    data = get_task("sql").load(str(path), seed=1)
    assert len(data.train) == 8 and len(data.eval) == 2
    assert not {sql_example(r).prompt for r in data.eval} & {e.prompt for e in data.train}
    bad = write_jsonl(tmp_path / "bad.jsonl", gretel_rows(10, context="CREATE TABLE ("))
    with pytest.raises(DataError, match=r"bad\.jsonl:\d+: field 'sql_context'"):
        get_task("sql").load(str(bad))


def spider_files(directory: Path) -> Path:
    tables = [
        {**TABLES, "db_id": db, "table_names_original": [f"{db}_t", "other", "sqlite_sequence"]}
        for db in ("a", "b", "c", "d", "e")
    ]
    write_json(directory / "tables.json", tables)
    questions = [
        {
            "db_id": db,
            "question": f"Q{i} on {db}",
            "query": f"SELECT count(*) FROM {db}_t WHERE Artist_ID > {i}",
        }
        for db in ("a", "b", "c", "d", "e")
        for i in range(3)
    ]
    return write_json(directory / "dev.json", questions)


def test_spider_split_keeps_each_database_on_one_side(tmp_path: Path) -> None:
    spider_files(tmp_path)
    data = get_task("sql").load(str(tmp_path), seed=0)
    eval_dbs = {r.db_id for r in data.eval}
    assert len(eval_dbs) == 1 and len(data.eval) == 3 and len(data.train) == 12
    assert not any(f" on {db}\n" in e.prompt for e in data.train for db in eval_dbs)
    other = {r.db_id for r in get_task("sql").load(str(tmp_path / "dev.json"), seed=3).eval}
    assert other != eval_dbs  # another seed holds out another database


def test_spider_needs_tables_json(tmp_path: Path) -> None:
    spider_files(tmp_path)
    (tmp_path / "tables.json").unlink()
    with pytest.raises(MolfError, match="tables.json beside them"):
        get_task("sql").load(str(tmp_path))


def test_real_spider_files(data_root: Path) -> None:
    data = get_task("sql").load(str(data_root / "spider"))
    assert len(data.train) + len(data.eval) == 1034
    assert len({r.db_id for r in data.eval}) == 4  # 20% of the 20 dev databases
    eval_schemas = {r.context for r in data.eval}
    assert all(c.startswith("CREATE TABLE") for c in eval_schemas)
    assert not any(e.prompt.startswith(c) for e in data.train for c in eval_schemas)


def test_evaluate_end_to_end(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    task = get_task("sql")
    records = [record(r["sql"], line=i) for i, r in enumerate(gretel_rows(3), 1)]
    records.append(record("SELECT a FROM t", context="CREATE TABLE t (a INT);"))
    metrics = task.evaluate(model, tokenizer, records, batch_size=2, max_new_tokens=12)
    assert set(metrics) == {
        "exact_match",
        "valid_sql",
        "executes",
        "execution_accuracy",
        "execution_coverage",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["execution_coverage"] == 0.75
    generated = generate(model, tokenizer, [sql_example(r).prompt for r in records], 12)
    assert metrics == sql_metrics(records, [postprocess_sql(g) for g in generated])
    spider = task.load(str(spider_files(tmp_path)), max_eval_samples=2).eval
    assert set(task.evaluate(model, tokenizer, spider, max_new_tokens=8)) == {
        "exact_match",
        "valid_sql",
        "executes",
    }
