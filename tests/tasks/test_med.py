"""MedMCQA: 1-based local rows, 0-based hub rows, prompts, splits, evaluation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import Example, get_task, med
from molf.tasks.base import DataPath
from molf.tasks.med import MedRecord, med_example, parse_choice, parse_med_row
from molf.tasks.scoring import completion_logprobs, generate
from molf.tasks.sources import Origin

from .helpers import medmcqa_row as row
from .helpers import write_jsonl


def test_local_rows_count_cop_from_one_and_hub_rows_from_zero() -> None:
    local = parse_med_row(row(1, 3), Origin("dev.jsonl", 1), cop_base=1)
    hub = parse_med_row(row(1, 2), Origin("hub:openlifescienceai/medmcqa[train]", 1), cop_base=0)
    assert (
        local
        == hub
        == MedRecord(
            "Which vitamin is question 1 about?",
            ("Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"),
            2,
        )
    )


def test_prompt_lists_lettered_options_and_ends_with_answer() -> None:
    example = med_example(MedRecord(" What? ", ("one", "two ", "three", "four"), 3))
    assert example == Example("Question: What?\nA. one\nB. two\nC. three\nD. four\nAnswer:", " D")


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"cop": 0}, "cop"),
        ({"cop": 5}, "cop"),
        ({"cop": "2"}, "cop"),
        ({"cop": True}, "cop"),
        ({"opc": None}, "opc"),
        ({"opd": 4}, "opd"),
        ({"question": ""}, "question"),
    ],
)
def test_malformed_local_row_names_file_line_and_field(
    tmp_path: Path, bad: dict, field: str
) -> None:
    path = write_jsonl(tmp_path / "dev.jsonl", [row(1, 1), row(2, 2), {**row(3, 1), **bad}])
    with pytest.raises(DataError, match=rf"dev\.jsonl:3: field '{field}'"):
        get_task("med").load(str(path))


def test_hub_cop_out_of_range_names_the_zero_based_range() -> None:
    with pytest.raises(DataError, match="must be an integer from 0 to 3, got 4"):
        parse_med_row(row(1, 4), Origin("hub:openlifescienceai/medmcqa[validation]", 9), cop_base=0)


def test_bad_json_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "dev.jsonl"
    path.write_text('{"question": "x"\n')
    with pytest.raises(DataError, match=r"dev\.jsonl:1: field '<json>'"):
        get_task("med").load(str(path))


def expected_part(question: str) -> str:
    """The split by the documented definition, recomputed with hashlib directly."""
    key = " ".join(question.lower().split())
    h = int(hashlib.sha256(f"molf-split-v1\0{key}".encode()).hexdigest()[:16], 16) / 2**64
    return "train" if h < 0.70 else "val" if h < 0.85 else "test"


def test_single_file_is_a_question_hash_split_that_ignores_seed_and_order(tmp_path: Path) -> None:
    rows = [row(i, 1 + i % 4) for i in range(60)]
    write_jsonl(tmp_path / "dev.jsonl", rows)
    task = get_task("med")
    val = task.load(str(tmp_path), split="val", seed=5)  # a directory: its dev.jsonl
    test = task.load(str(tmp_path), seed=5)  # split="test" is the default
    expected = {
        part: [r["question"] for r in rows if expected_part(r["question"]) == part]
        for part in ("train", "val", "test")
    }
    assert all(expected.values())  # the 60 questions fill every part
    assert {r.question for r in val.eval} == set(expected["val"])
    assert {r.question for r in test.eval} == set(expected["test"])
    trained = {e.prompt for e in test.train}
    assert trained == {e.prompt for e in val.train}
    assert trained == {
        med_example(parse_med_row(r, Origin("x", 1), 1)).prompt
        for r in rows
        if expected_part(r["question"]) == "train"
    }
    # neither --seed nor the file's order moves a question to another split
    write_jsonl(tmp_path / "reversed.jsonl", rows[::-1])
    other = task.load(str(tmp_path / "reversed.jsonl"), seed=6)
    assert set(other.eval) == set(test.eval) and set(other.train) == set(test.train)
    capped = task.load(str(tmp_path), seed=5, max_train_samples=3, max_eval_samples=2)
    assert len(capped.train) == 3 and len(capped.eval) == 2
    assert set(capped.eval) <= set(test.eval) and set(capped.train) <= set(test.train)


def test_duplicate_questions_never_cross_splits(tmp_path: Path) -> None:
    # the same question, written with other case and spacing, with other options
    rows = [row(i, 1) for i in range(30)]
    rows += [
        {**r, "question": "  " + r["question"].upper().replace(" ", "  "), "opa": "x"} for r in rows
    ]
    write_jsonl(tmp_path / "dev.jsonl", rows)
    parts = {}
    for split in ("val", "test"):
        data = get_task("med").load(str(tmp_path), split=split)
        parts[split] = {" ".join(r.question.lower().split()) for r in data.eval}
        parts["train"] = {
            " ".join(e.prompt.split("\n")[0].removeprefix("Question: ").lower().split())
            for e in data.train
        }
        assert len(data.eval) == 2 * len(parts[split])  # both copies, same side
    assert len(parts["train"]) + len(parts["val"]) + len(parts["test"]) == 30
    assert not (
        parts["train"] & parts["val"]
        or parts["train"] & parts["test"]
        or parts["val"] & parts["test"]
    )


def test_unknown_split_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", [row(i, 1) for i in range(20)])
    with pytest.raises(MolfError, match="split must be one of val, test, got 'train'"):
        get_task("med").load(str(tmp_path), split="train")


def test_hub_val_and_test_are_the_two_hash_halves_of_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = {"train": [row(i, 0) for i in range(5)], "validation": [row(i, 1) for i in range(40)]}

    def hub_rows(dataset_id: str, split: str):  # stands in for the download only
        assert dataset_id == med.HUB_ID
        return [(Origin(f"hub:{dataset_id}[{split}]", n), r) for n, r in enumerate(hub[split], 1)]

    monkeypatch.setattr(med, "hub_rows", hub_rows)
    val = get_task("med").load(None, split="val")
    test = get_task("med").load(None, split="test")
    assert val.train == test.train and len(test.train) == 5
    val_q, test_q = {r.question for r in val.eval}, {r.question for r in test.eval}
    assert val_q and test_q and not val_q & test_q
    assert val_q | test_q == {r["question"] for r in hub["validation"]}
    assert "val: a question-hash half of validation" in val.source


def test_directory_without_dev_jsonl_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MolfError, match="dev.jsonl"):
        get_task("med").load(str(tmp_path))


def test_real_dev_file(shared_data: Path) -> None:
    task = get_task("med")
    val = task.load(str(shared_data / "medmcqa"), split="val")
    test = task.load(str(shared_data / "medmcqa"), split="test")
    rows = [json.loads(line) for line in (shared_data / "medmcqa" / "dev.jsonl").open()]
    counts = {p: sum(expected_part(r["question"]) == p for r in rows) for p in ("val", "test")}
    assert (len(val.train), len(val.eval), len(test.eval)) == (
        4183 - counts["val"] - counts["test"],
        counts["val"],
        counts["test"],
    )
    assert (len(val.train), len(val.eval), len(test.eval)) == (2958, 598, 627)
    assert not {r.question for r in val.eval} & {r.question for r in test.eval}
    assert {e.completion for e in val.train} == {" A", " B", " C", " D"}
    # MedMCQA is unbalanced: always answering A beats chance
    baselines = task.baselines(test.eval)
    share_a = sum(r.answer == 0 for r in test.eval) / len(test.eval)
    assert baselines == {"chance_accuracy": 0.25, "majority_accuracy": share_a} and share_a > 0.25


def test_baselines_on_hand_made_answers() -> None:
    records = [MedRecord("q", ("a", "b", "c", "d"), answer) for answer in (2, 2, 1, 2, 0)]
    assert get_task("med").baselines(records) == {
        "chance_accuracy": 0.25,
        "majority_accuracy": 0.6,
    }


def test_evaluate_accuracy_is_the_argmax_of_option_scores(tiny) -> None:
    model, tokenizer = tiny
    task = get_task("med")
    records = [
        MedRecord(f"Tom has {n} apples. How many?", ("one", "two", "three", "four"), n - 1)
        for n in (1, 2, 3, 4, 2)
    ]
    predictions: list[dict] = []
    metrics = task.evaluate(
        model, tokenizer, records, batch_size=3, max_new_tokens=4, predictions=predictions
    )
    assert set(metrics) == {"accuracy", "generation_accuracy", "accuracy_margin"}
    assert 0.0 <= metrics["generation_accuracy"] <= 1.0
    right, margins = 0, []
    for r, line in zip(records, predictions, strict=True):
        prompt = med_example(r).prompt
        scores = [
            completion_logprobs(model, tokenizer, [prompt], [" " + x], batch_size=1)[0]
            for x in "ABCD"
        ]
        right += scores.index(max(scores)) == r.answer
        margins.append(scores[r.answer] - max(s for i, s in enumerate(scores) if i != r.answer))
        assert line["prompt"] == prompt and line["reference"] == "ABCD"[r.answer]
        assert list(line["scores"]) == list("ABCD")
        assert list(line["scores"].values()) == pytest.approx(scores, abs=1e-5)
        assert line["output"] == generate(model, tokenizer, [prompt], 4)[0]
        assert line["generation_correct"] == (parse_choice(line["output"]) == r.answer)
    assert metrics["accuracy"] == right / len(records)
    assert metrics["accuracy_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    # the per-question lines average to the metrics exactly
    assert metrics["accuracy"] == sum(x["correct"] for x in predictions) / len(records)
    assert metrics["generation_accuracy"] == sum(
        x["generation_correct"] for x in predictions
    ) / len(records)


def test_data_path_is_the_named_file_or_directory(tmp_path: Path) -> None:
    med_task = get_task("med")
    assert med_task.data_path(str(tmp_path)) == DataPath(tmp_path)
    assert med_task.data_path("~/dev.jsonl") == DataPath(Path.home() / "dev.jsonl")
    assert med_task.data_path("builtin") == DataPath(Path("builtin"))  # med has no built-in set
