"""CounterFact: both row layouts, the built-in set, loading, and evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import Example, get_task
from molf.tasks.fact import FactRecord, builtin_rows, parse_fact_row
from molf.tasks.fact_builtin import BUILTIN_FACTS
from molf.tasks.scoring import completion_logprobs
from molf.tasks.sources import Origin

from .helpers import EASYEDIT, ROME, write_json


def test_easyedit_row() -> None:
    assert parse_fact_row(EASYEDIT, Origin("cf.json", 1)) == FactRecord(
        prompt="The mother tongue of Danielle Darrieux is",
        target_new="English",
        target_true="French",
        paraphrases=("Danielle Darrieux spoke the language",),
        neighbours=(("The mother tongue of Michel Rocard is", "French"),),
    )


def test_rome_row_fills_the_template_and_uses_the_true_target_for_neighbours() -> None:
    assert parse_fact_row(ROME, Origin("hub:azhx/counterfact[train]", 1)) == FactRecord(
        prompt="The mother tongue of Danielle Darrieux is",
        target_new="English",
        target_true="French",
        paraphrases=("Danielle Darrieux spoke the language", "Darrieux's first language is"),
        neighbours=(
            ("Michel Rocard's mother tongue is", "French"),
            ("Jean Moulin speaks", "French"),
        ),
    )


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({k: v for k, v in EASYEDIT.items() if k != "locality_prompt"}, "locality_prompt"),
        ({**EASYEDIT, "target_new": ""}, "target_new"),
        ({**ROME, "paraphrase_prompts": []}, "paraphrase_prompts"),
        (
            {**ROME, "requested_rewrite": {**ROME["requested_rewrite"], "target_new": "English"}},
            "requested_rewrite.target_new.str",
        ),
        (
            {**ROME, "requested_rewrite": {**ROME["requested_rewrite"], "prompt": "Its tongue is"}},
            "requested_rewrite.prompt",
        ),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, row: dict, field: str) -> None:
    path = write_json(tmp_path / "cf.json", [EASYEDIT, row])
    with pytest.raises(DataError, match=rf"cf\.json:\d+: field '{field}'") as e:
        get_task("fact").load(str(path))
    assert e.value.line > 1 and e.value.field == field


def test_builtin_set_is_a_proper_counterfactual_set() -> None:
    records = [parse_fact_row(row, origin) for origin, row in builtin_rows()]
    assert len(records) == len(BUILTIN_FACTS) == 24
    assert len({r.prompt for r in records}) == 24
    for r in records:
        assert r.target_new != r.target_true
        # specificity needs the neighbour's true answer to differ from the injected one
        assert all(answer != r.target_new for _, answer in r.neighbours)


def test_load_trains_on_the_edits_and_evaluates_the_same_edits() -> None:
    data = get_task("fact").load("builtin", max_train_samples=10, max_eval_samples=4, seed=3)
    assert len(data.train) == 10 and len(data.eval) == 4
    trained = {(e.prompt, e.completion) for e in data.train}
    assert all((r.prompt, " " + r.target_new) in trained for r in data.eval)
    again = get_task("fact").load("builtin", max_train_samples=10, max_eval_samples=4, seed=3)
    assert again.train == data.train and again.eval == data.eval
    other = get_task("fact").load("builtin", max_train_samples=10, seed=4)
    assert other.train != data.train


def test_hub_layout_file_and_directory(tmp_path: Path) -> None:
    write_json(tmp_path / "counterfact-train.json", [ROME, EASYEDIT])
    write_json(tmp_path / "other.json", [EASYEDIT])
    data = get_task("fact").load(str(tmp_path))
    assert data.source.endswith("counterfact-train.json")
    assert (
        sorted(data.train, key=lambda e: e.prompt)
        == [Example("The mother tongue of Danielle Darrieux is", " English")] * 2
    )


def test_directory_without_a_single_json_file_is_an_error(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", [EASYEDIT])
    write_json(tmp_path / "b.json", [EASYEDIT])
    with pytest.raises(MolfError, match="counterfact-train.json or exactly one .json file"):
        get_task("fact").load(str(tmp_path))
    (tmp_path / "b.json").unlink()
    assert get_task("fact").load(str(tmp_path)).source.endswith("a.json")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MolfError, match="no edits left"):
        get_task("fact").load(str(write_json(tmp_path / "cf.json", [])))


def test_real_counterfact_files(data_root: Path) -> None:
    task = get_task("fact")
    data = task.load(str(data_root / "counterfact"), max_train_samples=50, max_eval_samples=20)
    assert data.source.endswith("counterfact-train.json")
    assert len(data.train) == 50 and len(data.eval) == 20
    edit = task.load(str(data_root / "counterfact" / "counterfact-val.json"))
    assert len(edit.train) == len(edit.eval) == 1919
    assert all(r.paraphrases and r.neighbours for r in edit.eval)


def test_evaluate_matches_a_slow_one_by_one_recomputation(tiny) -> None:
    model, tokenizer = tiny
    task = get_task("fact")
    records = task.load("builtin", max_eval_samples=6, seed=1).eval
    metrics = task.evaluate(model, tokenizer, records, batch_size=4)
    assert set(metrics) == {"efficacy", "generalization", "specificity"}
    assert task.primary_metric in metrics

    def prefers(prompt: str, wanted: str, other: str) -> bool:
        score = lambda c: completion_logprobs(model, tokenizer, [prompt], [c], batch_size=1)[0]
        return score(" " + wanted) > score(" " + other)

    efficacy = [prefers(r.prompt, r.target_new, r.target_true) for r in records]
    general = [prefers(p, r.target_new, r.target_true) for r in records for p in r.paraphrases]
    specific = [prefers(p, t, r.target_new) for r in records for p, t in r.neighbours]
    assert metrics["efficacy"] == sum(efficacy) / len(efficacy)
    assert metrics["generalization"] == sum(general) / len(general)
    assert metrics["specificity"] == sum(specific) / len(specific)
