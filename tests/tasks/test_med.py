"""MedMCQA: 1-based local rows, 0-based hub rows, prompts, splits, evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import Example, get_task
from molf.tasks.med import MedRecord, med_example, parse_med_row
from molf.tasks.scoring import completion_logprobs
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


def test_single_file_is_split_seeded_and_disjoint(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "dev.jsonl", [row(i, 1 + i % 4) for i in range(20)])
    task = get_task("med")
    data = task.load(str(tmp_path), seed=5)  # a directory: its dev.jsonl
    assert len(data.train) == 16 and len(data.eval) == 4
    eval_prompts = {med_example(r).prompt for r in data.eval}
    assert not eval_prompts & {e.prompt for e in data.train}
    assert task.load(str(tmp_path / "dev.jsonl"), seed=5).eval == data.eval
    assert task.load(str(tmp_path), seed=6).eval != data.eval
    capped = task.load(str(tmp_path), seed=5, max_train_samples=3, max_eval_samples=2)
    assert len(capped.train) == 3 and len(capped.eval) == 2
    assert set(capped.eval) <= set(data.eval)


def test_directory_without_dev_jsonl_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MolfError, match="dev.jsonl"):
        get_task("med").load(str(tmp_path))


def test_real_dev_file(data_root: Path) -> None:
    data = get_task("med").load(str(data_root / "medmcqa"))
    assert len(data.train) + len(data.eval) == 4183
    assert len(data.eval) == round(4183 * 0.2)
    assert {e.completion for e in data.train} == {" A", " B", " C", " D"}


def test_evaluate_accuracy_is_the_argmax_of_option_scores(tiny) -> None:
    model, tokenizer = tiny
    task = get_task("med")
    records = [
        MedRecord(f"Tom has {n} apples. How many?", ("one", "two", "three", "four"), n - 1)
        for n in (1, 2, 3, 4, 2)
    ]
    metrics = task.evaluate(model, tokenizer, records, batch_size=3, max_new_tokens=4)
    assert set(metrics) == {"accuracy", "generation_accuracy"}
    assert 0.0 <= metrics["generation_accuracy"] <= 1.0
    right = 0
    for r in records:
        prompt = med_example(r).prompt
        scores = [
            completion_logprobs(model, tokenizer, [prompt], [" " + x], batch_size=1)[0]
            for x in "ABCD"
        ]
        right += scores.index(max(scores)) == r.answer
    assert metrics["accuracy"] == right / len(records)
