"""The user's own prompt/completion lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks import Example, TaskData, get_task
from molf.tasks.base import NO_PROMPT, DataPath
from molf.tasks.jsonl import ON_TRAIN_WARNING, prompt_key
from molf.tasks.scoring import completion_logprobs, generate
from molf.tasks.sources import hash_fraction

from .helpers import write_jsonl

PAIRS = [
    {"prompt": "Once upon a time", "completion": ", there was a little girl"},
    {"prompt": "Tom", "completion": " and Lily were playing"},
    {"prompt": "The sun", "completion": " was hot"},
]


MANY = [{"prompt": f"Question {i}?", "completion": f" answer {i}"} for i in range(400)]


def load_on_train(path: Path, **kw) -> TaskData:
    """The jsonl task's data with --eval-on-train (which warns)."""
    with pytest.warns(UserWarning, match="--eval-on-train: evaluating on the training rows"):
        return get_task("jsonl").load(str(path), eval_on_train=True, **kw)


def test_a_file_is_cut_by_prompt_hash_into_train_val_and_test(tmp_path: Path) -> None:
    """train h >= 0.1, val h < 0.05, test 0.05 <= h < 0.1 (h: the prompt's hash)."""
    path = write_jsonl(tmp_path / "mine.jsonl", MANY)
    val = get_task("jsonl").load(str(path), split="val")
    test = get_task("jsonl").load(str(path), split="test")
    assert val.train == test.train
    train, vals, tests = set(val.train), set(val.eval), set(test.eval)
    assert not (train & vals or train & tests or vals & tests)
    assert len(train | vals | tests) == len(MANY)
    assert all(hash_fraction(e.prompt) >= 0.1 for e in train)
    assert all(hash_fraction(e.prompt) < 0.05 for e in vals)
    assert all(0.05 <= hash_fraction(e.prompt) < 0.1 for e in tests)
    assert 20 <= len(vals) + len(tests) <= 60  # about 10% of 400
    assert test.evaluated == (
        f"the test half of the held-out 10% of {path} (by prompt hash): {len(tests)} pairs"
    )
    assert val.evaluated.startswith(f"the val half of the held-out 10% of {path}")


def test_the_split_ignores_seed_order_and_caps_and_keeps_a_prompt_on_one_side(
    tmp_path: Path,
) -> None:
    rows = [*MANY, *({"prompt": r["prompt"].upper(), "completion": " other"} for r in MANY[:50])]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    first = get_task("jsonl").load(str(path), seed=0)
    again = get_task("jsonl").load(str(path), seed=7, max_train_samples=100)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    other = get_task("jsonl").load(str(shuffled), seed=3)
    assert set(first.eval) == set(again.eval) == set(other.eval)
    assert set(first.train) == set(other.train) and set(again.train) <= set(first.train)
    held = {normalised(e.prompt) for e in first.eval}  # the hash normalises the case too
    assert held and not held & {normalised(e.prompt) for e in first.train}


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def test_a_larger_val_size_holds_out_more_and_a_tiny_file_says_what_to_do(
    tmp_path: Path,
) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", MANY)
    small = get_task("jsonl").load(str(path))
    large = get_task("jsonl").load(str(path), val_size=0.5)
    assert len(small.eval) < len(large.eval) and set(large.train) < set(small.train)
    assert "held-out 50%" in large.evaluated
    tiny = write_jsonl(tmp_path / "tiny.jsonl", PAIRS)
    with pytest.raises(MolfError, match=r"--val-size 0\.1 holds out no test rows of its 3.*"
                       r"--eval-on-train for a smoke test"):  # fmt: skip
        get_task("jsonl").load(str(tiny))
    with pytest.raises(MolfError, match=r"--val-size must be in \(0, 1\), got 1"):
        get_task("jsonl").load(str(tiny), val_size=1)


def test_eval_on_train_trains_and_evaluates_on_every_row_and_warns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", PAIRS)
    for split in ("val", "test"):
        data = load_on_train(path, split=split, seed=2)
        expected = {Example(p["prompt"], p["completion"]) for p in PAIRS}
        assert set(data.train) == set(data.eval) == expected
        assert data.evaluated == "the training rows (--eval-on-train): 3 pairs"
    assert "not how it does on rows it has not seen" in ON_TRAIN_WARNING
    with pytest.raises(MolfError, match="split must be one of val, test"):
        get_task("jsonl").load(str(path), split="dev")


def test_the_prompt_key_of_each_kind_of_prompt() -> None:
    chat = ({"role": "user", "content": "Hi"},)
    assert prompt_key(Example("Tom", " ran")) == "Tom"
    assert prompt_key(Example(NO_PROMPT, "Once upon a time")) == "Once upon a time"
    assert prompt_key(Example(chat, "Hello")) == '[{"content": "Hi", "role": "user"}]'


def test_a_directory_has_train_and_eval_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS[:2])
    write_jsonl(tmp_path / "eval.jsonl", PAIRS[2:])
    data = get_task("jsonl").load(str(tmp_path), max_train_samples=1)
    assert len(data.train) == 1 and data.train[0].prompt in {"Once upon a time", "Tom"}
    assert data.eval == [Example("The sun", " was hot")]
    assert data.evaluated == f"the rows of {tmp_path / 'eval.jsonl'}: 1 pairs"


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
    data = load_on_train(write_jsonl(tmp_path / "chat.jsonl", rows))
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
        get_task("jsonl").load(str(path), eval_on_train=True)


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
        data = load_on_train(path)
        assert (
            sorted(data.train, key=str) == sorted(expected, key=str) == sorted(data.eval, key=str)
        )
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nx,y\n")
    with pytest.raises(DataError, match=r"bad\.csv:1: field '<row>': no accepted layout"):
        get_task("jsonl").load(str(bad))
    with pytest.warns(UserWarning, match="--eval-on-train"):
        mapped = get_task("jsonl").load(
            str(bad), eval_on_train=True, prompt_field="question", completion_field="answer"
        )
    assert mapped.train == [Example("x", "y")]


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
    assert test.evaluated == f"the test split of {repo}: 1 pairs"

    only_train = tmp_path / "only-train"  # no held-out split: its train split is cut
    only_train.mkdir()
    pq.write_table(pa.Table.from_pylist(MANY), only_train / "train.parquet")
    data = get_task("jsonl").load(str(only_train))
    vals = get_task("jsonl").load(str(only_train), split="val").eval
    assert len(set(data.train) | set(data.eval) | set(vals)) == 400
    assert len(data.train) + len(data.eval) + len(vals) == 400
    assert "cut by prompt hash" in data.source
    assert data.evaluated.startswith(f"the test half of the held-out 10% of {only_train}[train]")


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
        get_task("jsonl").load(str(path), eval_on_train=True)


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


def test_text_rows_are_scored_not_generated(tiny_model_dir) -> None:
    """A text row has no prompt to generate from: its line has its log-prob and is tagged
    mean_logprob; exact match is over the pairs, and absent when every row is text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = get_task("jsonl")
    text_row = Example(NO_PROMPT, "Once upon a time there was a cat")
    pair = Example("Tom", " ran")
    predictions: list[dict] = []
    metrics = task.evaluate(
        model, tokenizer, [text_row, pair], max_new_tokens=3, predictions=predictions
    )
    scores = completion_logprobs(
        model, tokenizer, [NO_PROMPT, "Tom"], [text_row.completion, " ran"]
    )
    assert metrics["mean_logprob"] == pytest.approx(sum(scores) / 2, abs=1e-6)
    assert metrics["exact_match"] == float(predictions[1]["correct"])
    assert predictions[0] == {
        "prompt": NO_PROMPT,
        "reference": text_row.completion,
        "logprob": pytest.approx(scores[0], abs=1e-6),
        "metric": "mean_logprob",
    }
    assert predictions[1]["output"] == generate(model, tokenizer, ["Tom"], 3)[0]
    only_text = task.evaluate(model, tokenizer, [text_row], max_new_tokens=3)
    assert only_text == {"mean_logprob": pytest.approx(scores[0], abs=1e-6)}
