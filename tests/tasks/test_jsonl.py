"""The user's own prompt/completion lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import Example, get_task
from molf.tasks.base import DataPath
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


def test_without_data_it_says_what_to_pass() -> None:
    with pytest.raises(MolfError, match="pass --data"):
        get_task("jsonl").load(None)


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


def test_chat_rows_in_both_shapes_become_conversation_prompts(tmp_path: Path) -> None:
    rows = [
        {"messages": CHAT},
        {"prompt": CHAT[:2], "completion": CHAT[2:]},  # TRL's conversational form
        PAIRS[0],
    ]
    data = get_task("jsonl").load(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    conversation = Example(tuple(CHAT[:2]), "Paris")
    assert data.train.count(conversation) == 2
    assert Example(PAIRS[0]["prompt"], PAIRS[0]["completion"]) in data.train


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"messages": CHAT[:2]}, "messages"),  # no assistant reply at the end
        ({"messages": CHAT[2:]}, "messages"),  # a reply with nothing before it
        ({"messages": [{"role": "user"}, CHAT[2]]}, "messages"),
        ({"prompt": CHAT[:2], "completion": CHAT}, "completion"),
        ({"prompt": CHAT[:2], "completion": "Paris"}, "completion"),
    ],
)
def test_malformed_chat_rows_name_the_line_and_field(tmp_path: Path, bad, field) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, bad])
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: field '{field}'"):
        get_task("jsonl").load(str(path))


def test_csv_and_parquet_files_are_read_through_datasets(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = tmp_path / "mine.csv"
    csv.write_text(
        "prompt,completion\n" + "".join(f'"{p["prompt"]}","{p["completion"]}"\n' for p in PAIRS)
    )
    parquet = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(PAIRS), parquet)
    expected = [Example(p["prompt"], p["completion"]) for p in PAIRS]
    for path in (csv, parquet):
        data = get_task("jsonl").load(str(path))
        assert (
            sorted(data.train, key=str) == sorted(expected, key=str) == sorted(data.eval, key=str)
        )
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nx,y\n")
    with pytest.raises(DataError, match=r"bad\.csv:1: field 'prompt'"):
        get_task("jsonl").load(str(bad))


def test_a_dataset_layout_trains_on_train_and_evaluates_on_test_or_validation(
    tmp_path: Path,
) -> None:
    """The layout a hub dataset repo has (split files), loaded with datasets.load_dataset:
    the same call a hub id takes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path / "my-dataset"
    (repo / "data").mkdir(parents=True)
    for split, rows in (("train", PAIRS[:1]), ("validation", PAIRS[1:2]), ("test", PAIRS[2:])):
        pq.write_table(
            pa.Table.from_pylist(rows), repo / "data" / f"{split}-00000-of-00001.parquet"
        )
    test = get_task("jsonl").load(str(repo))
    val = get_task("jsonl").load(str(repo), split="val")
    assert test.train == val.train == [Example(PAIRS[0]["prompt"], PAIRS[0]["completion"])]
    assert test.eval == [Example(PAIRS[2]["prompt"], PAIRS[2]["completion"])]
    assert val.eval == [Example(PAIRS[1]["prompt"], PAIRS[1]["completion"])]
    assert "eval: test" in test.source and "eval: validation" in val.source

    only_train = tmp_path / "only-train"
    only_train.mkdir()
    pq.write_table(pa.Table.from_pylist(PAIRS), only_train / "train.parquet")
    data = get_task("jsonl").load(str(only_train))
    assert len(data.eval) == len(data.train) == 3 and "eval: train" in data.source


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


def test_data_path_is_the_named_path_or_none_for_a_hub_dataset_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jsonl = get_task("jsonl")
    monkeypatch.chdir(tmp_path)
    assert jsonl.data_path("owner/name") == DataPath(None)  # a hub dataset id
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert jsonl.data_path("owner/name") == DataPath(Path("owner/name"))  # a local copy
    assert jsonl.data_path(str(tmp_path / "pairs.jsonl")) == DataPath(tmp_path / "pairs.jsonl")
