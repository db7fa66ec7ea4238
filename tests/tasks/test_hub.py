"""The hub code paths, fed hand-written hub-layout rows in place of a download.

Only ``hub_rows`` (the download) is replaced; the rows then go through the same
parsers, splits and checks as real hub rows would.
"""

from __future__ import annotations

import pytest

from molf.tasks import fact, get_task, med, sql
from molf.tasks.sources import Origin

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
    asked = fake_hub(
        monkeypatch,
        med,
        {
            (med.HUB_ID, "train"): [med_row(1, 0), med_row(2, 4), med_row(3, 3)],
            (med.HUB_ID, "validation"): [med_row(4, 1)],
        },
    )
    data = get_task("med").load(None)
    assert asked == [(med.HUB_ID, "train"), (med.HUB_ID, "validation")]
    assert sorted(e.completion for e in data.train) == [" A", " D"]
    assert [r.answer for r in data.eval] == [1]
    assert data.source == f"hub:{med.HUB_ID} (train / validation) (skipped 1 malformed rows)"


def test_counterfact_hub_reads_the_rome_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    other = {**ROME, "requested_rewrite": {**ROME["requested_rewrite"], "subject": "Jean Moulin"}}
    fake_hub(monkeypatch, fact, {(fact.HUB_ID, "train"): [ROME, other, {"case_id": 3}]})
    data = get_task("fact").load(None)
    assert sorted(e.prompt for e in data.train) == [
        "The mother tongue of Danielle Darrieux is",
        "The mother tongue of Jean Moulin is",
    ]
    assert len(data.eval) == 2 and "skipped 1 malformed rows" in data.source


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
