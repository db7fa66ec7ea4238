"""CounterFact: both row layouts, the built-in set, loading, and evaluation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from molf.errors import DataError, MolfError
from molf.tasks import get_task
from molf.tasks.base import DataPath
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
    # the edits are the evaluation records: every seed of a study gets the same ones
    other = get_task("fact").load("builtin", max_train_samples=10, max_eval_samples=4, seed=4)
    assert other.train == data.train and other.eval == data.eval
    # the built-in demo set is too small to hold out from: val and test are all of it
    val, test = (get_task("fact").load("builtin", split=s) for s in ("val", "test"))
    assert set(val.train) == set(test.train) and len(test.train) == 24


def edit(i: int) -> dict:
    return {**EASYEDIT, "prompt": f"The mother tongue of person {i} is"}


def is_val(prompt: str) -> bool:
    """The documented half, recomputed with hashlib directly."""
    key = " ".join(prompt.lower().split()).encode()
    return int(hashlib.sha256(b"molf-split-v1\x00" + key).hexdigest()[:16], 16) / 2**64 < 0.5


def test_a_file_is_cut_in_two_prompt_hash_halves(tmp_path: Path) -> None:
    rows = [edit(i) for i in range(40)] + [{**edit(3), "target_new": "German"}]
    path = write_json(tmp_path / "cf.json", rows)
    task = get_task("fact")
    val, test = (task.load(str(path), split=s, seed=7) for s in ("val", "test"))
    assert {e.prompt for e in val.train} == {r["prompt"] for r in rows if is_val(r["prompt"])}
    assert {e.prompt for e in test.train} == {r["prompt"] for r in rows if not is_val(r["prompt"])}
    assert len(val.train) + len(test.train) == 41 and val.train and test.train
    assert "(val: a prompt-hash half of the edits)" in val.source
    # the two edits of one prompt stay on one side; seed and file order do not matter
    on_side = test if not is_val(edit(3)["prompt"]) else val
    assert {" English", " German"} <= {e.completion for e in on_side.train if "son 3 " in e.prompt}
    shuffled = task.load(str(write_json(tmp_path / "r.json", rows[::-1])), split="val", seed=1)
    assert set(shuffled.train) == set(val.train)


def test_directory_reads_the_val_or_the_edit_file(tmp_path: Path) -> None:
    write_json(tmp_path / "counterfact-train.json", [edit(1)])
    write_json(tmp_path / "counterfact-val.json", [ROME, edit(2)])
    write_json(tmp_path / "counterfact-edit.json", [edit(3), edit(4), edit(5)])
    task = get_task("fact")
    val = task.load(str(tmp_path), split="val")
    assert val.source.endswith("counterfact-val.json")
    assert sorted(e.prompt for e in val.train) == [
        "The mother tongue of Danielle Darrieux is",
        "The mother tongue of person 2 is",
    ]
    test = task.load(str(tmp_path))  # split="test" is the default
    assert test.source.endswith("counterfact-edit.json")
    assert sorted(e.prompt for e in test.train) == [edit(i)["prompt"] for i in (3, 4, 5)]
    assert {r.prompt for r in test.eval} == {e.prompt for e in test.train}


def test_directory_with_one_split_file_only_is_an_error(tmp_path: Path) -> None:
    write_json(tmp_path / "counterfact-edit.json", [edit(1)])
    with pytest.raises(MolfError, match="has counterfact-edit.json but not counterfact-val.json"):
        get_task("fact").load(str(tmp_path), split="test")


def test_directory_without_split_files_needs_a_single_json_file(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", [edit(i) for i in range(20)])
    write_json(tmp_path / "b.json", [EASYEDIT])
    with pytest.raises(MolfError, match="or exactly one .json file there, found 2"):
        get_task("fact").load(str(tmp_path))
    (tmp_path / "b.json").unlink()
    data = get_task("fact").load(str(tmp_path), split="val")
    assert data.source == f"{tmp_path / 'a.json'} (val: a prompt-hash half of the edits)"
    assert {e.prompt for e in data.train} == {
        edit(i)["prompt"] for i in range(20) if is_val(edit(i)["prompt"])
    }


def test_unknown_split_is_an_error() -> None:
    with pytest.raises(MolfError, match="split must be one of val, test"):
        get_task("fact").load("builtin", split="train")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MolfError, match="no edits left"):
        get_task("fact").load(str(write_json(tmp_path / "cf.json", [])))


def test_real_counterfact_files(shared_data: Path) -> None:
    task = get_task("fact")
    val = task.load(str(shared_data / "counterfact"), split="val")
    test = task.load(str(shared_data / "counterfact"), max_train_samples=50, max_eval_samples=20)
    assert val.source.endswith("counterfact-val.json") and len(val.train) == 1919
    assert test.source.endswith("counterfact-edit.json")
    assert len(test.train) == 50 and len(test.eval) == 20
    everything = task.load(str(shared_data / "counterfact"), split="test")
    assert len(everything.train) == 10000
    assert not set(val.train) & set(everything.train)  # no edit is in both
    halves = [
        task.load(str(shared_data / "counterfact" / "counterfact-val.json"), split=s)
        for s in ("val", "test")
    ]
    assert [len(h.train) for h in halves] == [930, 989]
    assert set(halves[0].train) | set(halves[1].train) == set(val.train)
    assert all(r.paraphrases and r.neighbours for r in halves[0].eval)


def test_evaluate_matches_a_slow_one_by_one_recomputation(tiny) -> None:
    model, tokenizer = tiny
    task = get_task("fact")
    records = task.load("builtin", max_eval_samples=6, seed=1).eval
    predictions: list[dict] = []
    metrics = task.evaluate(model, tokenizer, records, batch_size=4, predictions=predictions)
    names = ("efficacy", "generalization", "specificity")
    assert set(metrics) == {*names, *(f"{n}_first_token" for n in names), "efficacy_margin"}
    assert task.primary_metric in metrics
    one = lambda p, c: completion_logprobs(model, tokenizer, [p], [" " + c], batch_size=1)[0]
    margins = [one(r.prompt, r.target_new) - one(r.prompt, r.target_true) for r in records]
    assert metrics["efficacy_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)

    def prefers(prompt: str, wanted: str, other: str) -> bool:
        score = lambda c: completion_logprobs(model, tokenizer, [prompt], [c], batch_size=1)[0]
        return score(" " + wanted) > score(" " + other)

    def prefers_first_token(prompt: str, wanted: str, other: str) -> bool:
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]
        logp = logits.float().log_softmax(-1)
        first = lambda c: tokenizer(" " + c, add_special_tokens=False)["input_ids"][0]
        return bool(logp[first(wanted)] > logp[first(other)])

    for check, suffix in ((prefers, ""), (prefers_first_token, "_first_token")):
        efficacy = [check(r.prompt, r.target_new, r.target_true) for r in records]
        general = [check(p, r.target_new, r.target_true) for r in records for p in r.paraphrases]
        specific = [check(p, t, r.target_new) for r in records for p, t in r.neighbours]
        assert metrics["efficacy" + suffix] == sum(efficacy) / len(efficacy)
        assert metrics["generalization" + suffix] == sum(general) / len(general)
        assert metrics["specificity" + suffix] == sum(specific) / len(specific)
    # the two definitions differ here: stories260k's answers often share a first token
    assert any(metrics[n] != metrics[f"{n}_first_token"] for n in names)

    # one predictions line per contest, averaging to each metric exactly
    assert len(predictions) == 3 * len(records)
    for name in names:
        lines = [x for x in predictions if x["metric"] == name]
        assert metrics[name] == sum(x["correct"] for x in lines) / len(lines)
        assert metrics[f"{name}_first_token"] == sum(x["correct_first_token"] for x in lines) / len(
            lines
        )
    first = records[0]
    line = predictions[0]
    assert (line["metric"], line["prompt"], line["reference"]) == (
        "efficacy",
        first.prompt,
        " " + first.target_new,
    )
    assert line["scores"]["new"] == pytest.approx(
        completion_logprobs(model, tokenizer, [first.prompt], [" " + first.target_new])[0],
        abs=1e-5,
    )
    specific = next(x for x in predictions if x["metric"] == "specificity")
    assert specific["correct"] == (specific["scores"]["true"] > specific["scores"]["new"])


def test_data_path_is_the_named_file_or_none_for_the_builtin_edits(tmp_path: Path) -> None:
    fact = get_task("fact")
    assert fact.data_path("builtin") == DataPath(None)
    assert fact.data_path(str(tmp_path / "cf.json")) == DataPath(tmp_path / "cf.json")
    assert fact.data_path("~/counterfact") == DataPath(Path.home() / "counterfact")
