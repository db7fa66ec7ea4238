"""The user's own prompt/completion lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import Example, get_task
from molf.tasks.scoring import completion_logprobs, generate

from .helpers import write_jsonl

PAIRS = [
    {"prompt": "Once upon a time", "completion": ", there was a little girl"},
    {"prompt": "Tom", "completion": " and Lily were playing"},
    {"prompt": "The sun", "completion": " was hot"},
]


def test_a_file_is_both_train_and_eval(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", PAIRS)
    data = get_task("jsonl").load(str(path), seed=2)
    expected = {Example(p["prompt"], p["completion"]) for p in PAIRS}
    assert set(data.train) == set(data.eval) == expected
    assert data.source == str(path)


def test_a_directory_has_train_and_eval_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS[:2])
    write_jsonl(tmp_path / "eval.jsonl", PAIRS[2:])
    data = get_task("jsonl").load(str(tmp_path), max_train_samples=1)
    assert len(data.train) == 1 and data.train[0].prompt in {"Once upon a time", "Tom"}
    assert data.eval == [Example("The sun", " was hot")]


def test_val_split_reads_val_jsonl_and_test_split_eval_jsonl(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS[:1])
    write_jsonl(tmp_path / "val.jsonl", PAIRS[1:2])
    write_jsonl(tmp_path / "eval.jsonl", PAIRS[2:])
    val = get_task("jsonl").load(str(tmp_path), split="val")
    test = get_task("jsonl").load(str(tmp_path), split="test")
    assert val.train == test.train == [Example("Once upon a time", ", there was a little girl")]
    assert val.eval == [Example("Tom", " and Lily were playing")]
    assert test.eval == [Example("The sun", " was hot")]


def test_val_split_without_val_jsonl_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "eval.jsonl", PAIRS)
    assert get_task("jsonl").load(str(tmp_path), split="test").eval
    with pytest.raises(MolfError, match="missing val.jsonl, which --eval-split val evaluates on"):
        get_task("jsonl").load(str(tmp_path), split="val")


def test_a_file_is_train_and_eval_for_both_splits(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", PAIRS)
    val, test = (get_task("jsonl").load(str(path), split=s) for s in ("val", "test"))
    assert set(val.eval) == set(test.eval) == set(test.train) == set(val.train)
    with pytest.raises(MolfError, match="split must be one of val, test"):
        get_task("jsonl").load(str(path), split="dev")


def test_a_directory_without_eval_jsonl_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    with pytest.raises(MolfError, match="missing eval.jsonl"):
        get_task("jsonl").load(str(tmp_path))


def test_there_is_no_hub_dataset() -> None:
    with pytest.raises(MolfError, match="pass --data"):
        get_task("jsonl").load(None)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"prompt": "x"}, "completion"),
        ({"prompt": "x", "completion": ""}, "completion"),
        ({"prompt": 3, "completion": "y"}, "prompt"),
        ([1, 2], "<row>"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, bad: object, field: str) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", [*PAIRS, bad])
    with pytest.raises(DataError, match=rf"mine\.jsonl:4: field '{field}'"):
        get_task("jsonl").load(str(path))


def test_malformed_eval_file_is_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    (tmp_path / "eval.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(DataError, match=r"eval\.jsonl:2: field '<json>'"):
        get_task("jsonl").load(str(tmp_path))


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "mine.jsonl").write_text("\n")
    with pytest.raises(MolfError, match="no training pairs left"):
        get_task("jsonl").load(str(tmp_path / "mine.jsonl"))


def test_evaluate_agrees_with_generation_and_scoring(tiny) -> None:
    model, tokenizer = tiny
    task = get_task("jsonl")
    records = [Example(p["prompt"], p["completion"]) for p in PAIRS]
    predictions: list[dict] = []
    metrics = task.evaluate(
        model, tokenizer, records, batch_size=2, max_new_tokens=8, predictions=predictions
    )
    assert task.baselines(records) == {}
    generated = generate(model, tokenizer, [r.prompt for r in records], 8)
    # the model's greedy ", there was a little girl" is the first completion exactly
    hits = [g.strip() == r.completion.strip() for g, r in zip(generated, records, strict=True)]
    assert hits[0] and metrics["exact_match"] == sum(hits) / 3
    scores = completion_logprobs(
        model, tokenizer, [r.prompt for r in records], [r.completion for r in records]
    )
    assert metrics["mean_logprob"] == pytest.approx(sum(scores) / 3, abs=1e-6)
    assert metrics["mean_logprob"] < 0
    # one line per pair; their "correct" averages to the exact match
    assert [(x["prompt"], x["reference"], x["output"]) for x in predictions] == [
        (r.prompt, r.completion, g) for r, g in zip(records, generated, strict=True)
    ]
    assert [x["logprob"] for x in predictions] == pytest.approx(scores, abs=1e-6)
    assert metrics["exact_match"] == sum(x["correct"] for x in predictions) / 3
