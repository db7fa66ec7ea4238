"""The layouts of the user's own rows (text, alpaca, sharegpt, messages, prompt/completion),
the column mapping, the unknown-layout error, and what each layout trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molf.errors import DataError
from molf.tasks import Example, get_task
from molf.tasks.base import NO_PROMPT
from molf.tasks.encoding import encode_example
from molf.tasks.layouts import Fields, layout_examples, parse_pair_row
from molf.tasks.sources import Origin

from .helpers import write_jsonl

ORIGIN = Origin("mine.jsonl", 3)
BOS, EOS, THE, CAT, SAT, ON, A, MAT = 1, 2, 3, 4, 5, 6, 7, 8  # the word_tokenizer's ids
HI_HELLO = ({"role": "user", "content": "Hi"},)


def parse(row: dict, fields: Fields | None = None) -> Example:
    return parse_pair_row(row, ORIGIN, fields or Fields())


def test_a_text_row_has_no_prompt_and_trains_on_every_token(word_tokenizer) -> None:
    example = parse({"text": "the cat sat"})
    assert example == Example(NO_PROMPT, "the cat sat")
    out = encode_example(word_tokenizer, example.prompt, example.completion)
    assert out["input_ids"] == [BOS, THE, CAT, SAT, EOS]
    assert out["labels"] == [-100, THE, CAT, SAT, EOS]  # all but the BOS nothing predicts


def test_an_alpaca_prompt_is_the_instruction_and_its_input(word_tokenizer) -> None:
    example = parse({"instruction": "the cat", "input": "on a mat", "output": "sat"})
    assert example == Example("the cat\non a mat", "\nsat")
    out = encode_example(word_tokenizer, example.prompt, example.completion)
    assert out["input_ids"] == [BOS, THE, CAT, ON, A, MAT, SAT, EOS]
    assert out["labels"] == [-100] * 6 + [SAT, EOS]
    # no (or an empty) input: the instruction alone; an output with its own space keeps it
    assert parse({"instruction": "the cat", "output": " sat"}) == Example("the cat", " sat")
    assert parse({"instruction": "the cat", "input": "", "output": "sat"}).prompt == "the cat"


def test_sharegpt_turns_become_messages_ending_with_the_reply() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    system = {"role": "system", "content": "Be brief."}
    assert parse(row) == Example((system, *HI_HELLO), "Hello")
    # ShareGPT turns also read under "messages", and role/content under "conversations"
    assert parse({"messages": row["conversations"][1:]}) == Example(HI_HELLO, "Hello")
    role_content = [HI_HELLO[0], {"role": "assistant", "content": "Hello"}]
    assert parse({"conversations": role_content}) == Example(HI_HELLO, "Hello")


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        ({"conversations": [{"from": "bot", "value": "Hi"}]}, "conversations", "human, gpt"),
        ({"conversations": [{"from": "human", "value": "Hi"}]}, "conversations", "must end"),
        ({"instruction": "x", "input": 3, "output": "y"}, "input", "must be a string"),
        ({"instruction": "x"}, "output", "missing"),
        ({"text": ""}, "text", "non-empty string"),
    ],
)
def test_malformed_rows_of_the_new_layouts_name_the_field(row, field, problem) -> None:
    with pytest.raises(DataError, match=rf"mine\.jsonl:3: field '{field}': .*{problem}"):
        parse(row)


def test_prompt_and_completion_rows_in_text_and_trl_form() -> None:
    assert parse({"prompt": "Tom", "completion": " ran"}) == Example("Tom", " ran")
    reply = [{"role": "assistant", "content": "Hello"}]
    assert parse({"prompt": list(HI_HELLO), "completion": reply}) == Example(HI_HELLO, "Hello")


def test_column_mapping_names_the_prompt_completion_and_messages_keys() -> None:
    fields = Fields(prompt="question", completion="answer.text", messages="chat")
    row = {"question": "Tom", "answer": {"text": " ran"}}
    assert parse(row, fields) == Example("Tom", " ran")  # a dot follows a nested object
    chat = [HI_HELLO[0], {"role": "assistant", "content": "Hello"}]
    assert parse({"chat": chat}, fields) == Example(HI_HELLO, "Hello")
    with pytest.raises(DataError, match=r"field 'answer\.text': missing"):
        parse({"question": "Tom", "answer": " ran"}, fields)
    # the default names are no longer read once renamed
    with pytest.raises(DataError, match="no accepted layout"):
        parse({"prompt": "Tom", "completion": " ran"}, fields)


def test_the_unknown_layout_error_lists_each_layout_with_an_example() -> None:
    with pytest.raises(DataError) as caught:
        parse({"question": "Tom", "answer": " ran"})
    message = str(caught.value)
    assert message.startswith(
        "mine.jsonl:3: field '<row>': no accepted layout has these keys ('question', 'answer')"
    )
    for name, example in layout_examples().items():
        assert f"{name} {json.dumps(example)}" in message
        parse(example)  # every example is a row of its layout
    assert "--prompt-field and --completion-field, or --messages-field" in message
    mapped = str(pytest.raises(DataError, parse, {"q": 1}, Fields("q1", "a1", "m1")).value)
    assert '{"q1": "2+2=", "a1": " 4"}' in mapped and '{"m1": [' in mapped


def test_one_file_may_mix_layouts_and_the_task_maps_columns(tmp_path: Path) -> None:
    rows = [
        {"text": "Once upon a time"},
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"q": "Tom", "a": " ran"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    mapping = {"prompt_field": "q", "completion_field": "a"}
    with pytest.warns(UserWarning, match="--eval-on-train"):
        data = get_task("jsonl").load(str(path), eval_on_train=True, **mapping)
    expected = [
        Example(NO_PROMPT, "Once upon a time"),
        Example("Add\n2 and 2", "\n4"),
        Example(HI_HELLO, "Hello"),
        Example("Tom", " ran"),
    ]
    assert sorted(data.train, key=repr) == sorted(expected, key=repr)
