"""The hub code paths, fed hand-written hub-layout rows in place of a download.

Only ``hub_rows`` (the download) is replaced; the rows then go through the same
parsers, splits and checks as real hub rows would.
"""

from __future__ import annotations

import pytest

from molf.tasks import fact, get_task, med
from molf.tasks.sources import Origin
from molf.tasks.sql import task as sql

from .helpers import ROME, SINGERS
from .helpers import medmcqa_row as med_row


def fake_hub(monkeypatch: pytest.MonkeyPatch, module, splits: dict[tuple[str, str], list]) -> list:
    asked = []

    def hub_rows(dataset_id: str, split: str):
        asked.append((dataset_id, split))
        name = f"hub:{dataset_id}[{split}]"
        return [(Origin(name, n), r) for n, r in enumerate(splits[(dataset_id, split)], 1)]

    monkeypatch.setattr(module, "hub_rows", hub_rows)
    return asked


def test_medmcqa_hub_uses_train_and_validation_zero_based_and_skips_bad_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    validation = [med_row(n, n % 4) for n in range(4, 24)]
    asked = fake_hub(
        monkeypatch,
        med,
        {
            (med.HUB_ID, "train"): [med_row(1, 0), med_row(2, 4), med_row(3, 3)],
            (med.HUB_ID, "validation"): validation,
        },
    )
    val, test = (get_task("med").load(None, split=s) for s in ("val", "test"))
    assert asked[:2] == [(med.HUB_ID, "train"), (med.HUB_ID, "validation")]
    assert sorted(e.completion for e in val.train) == [" A", " D"]  # cop 4 is out of 0..3
    assert val.train == test.train
    # the hub's validation split, halved by a hash of the question: disjoint, complete
    val_q = {r.question for r in val.eval}
    test_q = {r.question for r in test.eval}
    assert val_q and test_q and not val_q & test_q
    assert val_q | test_q == {row["question"] for row in validation}
    assert "skipped 1 malformed rows" in val.source


def test_counterfact_hub_reads_the_rome_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    subjects = ["Danielle Darrieux", "Jean Moulin", "Ada Lovelace", "Alan Turing", "Kurt Godel"]
    rows = [
        {**ROME, "requested_rewrite": {**ROME["requested_rewrite"], "subject": name}}
        for name in subjects
    ]
    fake_hub(monkeypatch, fact, {(fact.HUB_ID, "train"): [*rows, {"case_id": 3}]})
    val, test = (get_task("fact").load(None, split=s) for s in ("val", "test"))
    prompts = {
        split: {e.prompt for e in data.train} for split, data in (("val", val), ("test", test))
    }
    assert not prompts["val"] & prompts["test"]  # the edits are the data: halves never overlap
    assert prompts["val"] | prompts["test"] == {
        f"The mother tongue of {name} is" for name in subjects
    }
    assert len(val.eval) == len(val.train) and "skipped 1 malformed rows" in test.source


def test_text_to_sql_hub_checks_test_rows_in_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    good = {
        "sql_prompt": "How many?",
        "sql_context": SINGERS,
        "sql": "SELECT count(*) FROM singer;",
    }
    fake_hub(
        monkeypatch,
        sql,
        {
            (sql.HUB_ID, "train"): [good, {**good, "sql_context": "CREATE TABLE ("}],
            (sql.HUB_ID, "test"): [good, {**good, "sql_context": "CREATE TABLE ("}],
        },
    )
    data = get_task("sql").load(None)
    assert len(data.train) == 2  # training rows are not executed
    assert [r.origin.line for r in data.eval] == [1]
    assert data.source.endswith("(skipped 1 malformed rows)")
