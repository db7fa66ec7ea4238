"""Encoding pairs for training and scoring, padding, and the pad-token fallback."""

from __future__ import annotations

import pytest
import torch

from molf.errors import MolfError
from molf.tasks.base import NO_PROMPT
from molf.tasks.encoding import (
    chat_format,
    collate,
    encode_example,
    ensure_pad_token,
    prompt_ids,
    use_chat_template,
)
from molf.tasks.layouts import parse_pair_row
from molf.tasks.sources import Origin

# word ids in the word_tokenizer fixture
BOS, EOS, THE, CAT, SAT, ON, A, MAT = 1, 2, 3, 4, 5, 6, 7, 8


def test_prompt_gets_bos_completion_gets_eos_and_only_completion_is_labelled(
    word_tokenizer,
) -> None:
    out = encode_example(word_tokenizer, "the cat sat", " on a mat")
    assert out["input_ids"] == [BOS, THE, CAT, SAT, ON, A, MAT, EOS]
    assert out["labels"] == [-100, -100, -100, -100, ON, A, MAT, EOS]


def test_scoring_encoding_has_no_eos(word_tokenizer) -> None:
    out = encode_example(word_tokenizer, "the cat", " sat", add_eos=False)
    assert out == {"input_ids": [BOS, THE, CAT, SAT], "labels": [-100, -100, -100, SAT]}


def test_long_pair_loses_prompt_tokens_from_the_left(word_tokenizer) -> None:
    out = encode_example(word_tokenizer, "the cat sat on", " a mat", max_length=5)
    assert out["input_ids"] == [SAT, ON, A, MAT, EOS]
    assert out["labels"] == [-100, -100, A, MAT, EOS]


def test_too_long_completion_is_cut_from_the_right_keeping_one_prompt_token(
    word_tokenizer,
) -> None:
    out = encode_example(word_tokenizer, "the cat", " sat on a mat", max_length=3)
    assert out["input_ids"] == [CAT, SAT, ON]
    assert out["labels"] == [-100, SAT, ON]


def test_max_length_below_two_is_refused(word_tokenizer) -> None:
    with pytest.raises(MolfError, match="max_length must be at least 2"):
        encode_example(word_tokenizer, "the", " cat", max_length=1)


def test_collate_right_pads_ids_labels_and_mask() -> None:
    batch = collate(
        [{"input_ids": [1, 3, 4], "labels": [-100, 3, 4]}, {"input_ids": [1], "labels": [-100]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[1, 3, 4], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 3, 4], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_missing_pad_becomes_eos_then_unk(word_tokenizer) -> None:
    assert word_tokenizer.pad_token_id is None
    assert ensure_pad_token(word_tokenizer) == EOS == word_tokenizer.pad_token_id
    assert ensure_pad_token(word_tokenizer) == EOS  # an existing pad is kept


def test_pad_falls_back_to_unk_and_fails_without_any(word_tokenizer) -> None:
    word_tokenizer.eos_token = None
    assert ensure_pad_token(word_tokenizer) == 0  # <unk>
    word_tokenizer.pad_token = None
    word_tokenizer.unk_token = None
    with pytest.raises(MolfError, match="no pad, eos or unk token"):
        ensure_pad_token(word_tokenizer)


def test_real_sentencepiece_tokenizer_adds_bos_only_to_the_prompt(tiny) -> None:
    _, tokenizer = tiny
    out = encode_example(tokenizer, "Once upon a time", " there was")
    completion = tokenizer(" there was", add_special_tokens=False)["input_ids"]
    assert out["input_ids"][0] == tokenizer.bos_token_id
    assert out["input_ids"][-len(completion) - 1 :] == [*completion, tokenizer.eos_token_id]
    assert out["labels"].count(-100) == len(out["input_ids"]) - len(completion) - 1


# --- chat templates -----------------------------------------------------------------

DOG, RAN, EOT = 9, 10, 11  # "dog" opens a user turn, "ran" an assistant turn; <eot> ends one
TEMPLATE = (
    "<s> {% for m in messages %}{{ 'dog' if m['role'] == 'user' else 'ran' }} "
    "{{ m['content'] }} <eot> {% endfor %}{% if add_generation_prompt %}ran {% endif %}"
)


@pytest.fixture
def chat_tokenizer(word_tokenizer):
    """The word tokenizer with a real Jinja chat template and an end-of-turn special token."""
    word_tokenizer.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    assert word_tokenizer.convert_tokens_to_ids("<eot>") == EOT
    word_tokenizer.chat_template = TEMPLATE
    return word_tokenizer


def test_auto_without_a_template_changes_nothing(word_tokenizer) -> None:
    before = encode_example(word_tokenizer, "the cat sat", " on a mat")
    assert use_chat_template(word_tokenizer, "auto") is False
    assert chat_format(word_tokenizer) is None
    assert encode_example(word_tokenizer, "the cat sat", " on a mat") == before


def test_template_wraps_the_prompt_once_with_a_single_bos(chat_tokenizer) -> None:
    assert prompt_ids(chat_tokenizer, "the cat") == [BOS, THE, CAT]
    assert use_chat_template(chat_tokenizer, "auto") is True
    assert chat_format(chat_tokenizer).end_of_turn_id == EOT
    # the rendered text holds the BOS; the tokenizer must not add a second one
    assert prompt_ids(chat_tokenizer, "the cat") == [BOS, DOG, THE, CAT, EOT, RAN]


def test_chat_completion_drops_its_leading_space_and_ends_the_turn(chat_tokenizer) -> None:
    use_chat_template(chat_tokenizer, "auto")
    out = encode_example(chat_tokenizer, "the cat", " sat on")
    assert out["input_ids"] == [BOS, DOG, THE, CAT, EOT, RAN, SAT, ON, EOT]
    assert out["labels"] == [-100] * 6 + [SAT, ON, EOT]
    scored = encode_example(chat_tokenizer, "the cat", " sat", add_eos=False)
    assert scored["labels"] == [-100] * 6 + [SAT]


def test_chat_truncation_keeps_the_completion(chat_tokenizer) -> None:
    use_chat_template(chat_tokenizer, "auto")
    out = encode_example(chat_tokenizer, "the cat", " sat on", max_length=5)
    assert out["input_ids"] == [EOT, RAN, SAT, ON, EOT]
    assert out["labels"] == [-100, -100, SAT, ON, EOT]


def test_mode_none_removes_the_mark_and_bad_modes_are_refused(chat_tokenizer) -> None:
    use_chat_template(chat_tokenizer, "auto")
    assert use_chat_template(chat_tokenizer, "none") is False
    assert chat_format(chat_tokenizer) is None
    plain = encode_example(chat_tokenizer, "the cat", " sat")
    assert plain["input_ids"] == [BOS, THE, CAT, SAT, EOS]
    with pytest.raises(MolfError, match="--chat-template: 'always' is neither one of auto, none"):
        use_chat_template(chat_tokenizer, "always")


def test_end_of_turn_falls_back_to_eos(chat_tokenizer) -> None:
    # nothing special after the assistant's text
    chat_tokenizer.chat_template = TEMPLATE.replace("<eot>", "mat")
    use_chat_template(chat_tokenizer, "auto")
    assert chat_format(chat_tokenizer).end_of_turn_id == EOS
    assert encode_example(chat_tokenizer, "the", " cat")["labels"][-2:] == [CAT, EOS]
    # a template that refuses an assistant turn
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'user' %}"
        "{{ raise_exception('user turns only') }}{% endif %}dog {{ m['content'] }} "
        "{% endfor %}ran "
    )
    use_chat_template(chat_tokenizer, "auto")
    assert chat_format(chat_tokenizer).end_of_turn_id == EOS
    assert prompt_ids(chat_tokenizer, "the cat") == [DOG, THE, CAT, RAN]


def test_a_conversation_prompt_renders_every_turn_and_the_reply_is_labelled(
    chat_tokenizer,
) -> None:
    conversation = (
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat"},
        {"role": "user", "content": "a dog"},
    )
    with pytest.raises(MolfError, match="chat template"):
        prompt_ids(chat_tokenizer, conversation)  # not marked: plain text cannot hold it
    use_chat_template(chat_tokenizer, "auto")
    out = encode_example(chat_tokenizer, conversation, "ran")
    prompt = [BOS, DOG, THE, CAT, EOT, RAN, SAT, EOT, DOG, A, DOG, EOT, RAN]
    assert out["input_ids"] == [*prompt, RAN, EOT]
    assert out["labels"] == [-100] * len(prompt) + [RAN, EOT]


def test_a_text_row_stays_plain_text_under_a_chat_template(chat_tokenizer) -> None:
    use_chat_template(chat_tokenizer, "auto")
    out = encode_example(chat_tokenizer, NO_PROMPT, "the cat sat")
    assert out["input_ids"] == [BOS, THE, CAT, SAT, EOS]  # no template, EOS not <eot>
    assert out["labels"] == [-100, THE, CAT, SAT, EOS]
    cut = encode_example(chat_tokenizer, NO_PROMPT, "the cat sat", max_length=3)
    assert cut == {"input_ids": [BOS, THE, CAT], "labels": [-100, THE, CAT]}
    scored = encode_example(chat_tokenizer, NO_PROMPT, "the cat", add_eos=False)
    assert scored["labels"] == [-100, THE, CAT]


JINJA = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_chat_template_file_gives_a_model_without_one_its_template(
    tmp_path, tiny_model_dir
) -> None:
    from transformers import AutoTokenizer

    template = tmp_path / "chat.jinja"
    template.write_text(JINJA)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template is None
    assert use_chat_template(tokenizer, "auto") is False
    assert use_chat_template(tokenizer, str(template)) is True
    assert tokenizer.chat_template == JINJA
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    example = parse_pair_row(sharegpt, Origin("mine.jsonl", 1))
    conversation, reply = example.prompt, example.completion
    assert conversation == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    )
    out = encode_example(tokenizer, conversation, reply)
    # the prompt: what the tokenizer itself renders from the same template
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference.chat_template = template.read_text()
    head = reference.apply_chat_template(
        list(conversation), tokenize=True, add_generation_prompt=True
    )["input_ids"]
    tail = reference("Hello", add_special_tokens=False)["input_ids"] + [reference.eos_token_id]
    assert out["input_ids"] == head + tail
    assert out["labels"] == [-100] * len(head) + tail
    # saved with the tokenizer, so the trained model keeps it
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == JINJA


def test_a_missing_empty_or_broken_template_file_is_one_clear_error(
    tmp_path, word_tokenizer
) -> None:
    with pytest.raises(MolfError, match="'nope.jinja' is neither one of auto, none"):
        use_chat_template(word_tokenizer, "nope.jinja")
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(MolfError, match="the file is empty"):
        use_chat_template(word_tokenizer, str(empty))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{{ bos_token }}\n{% if %}\n")
    with pytest.raises(MolfError, match=rf"fails \({broken}:2: TemplateSyntaxError"):
        use_chat_template(word_tokenizer, str(broken))
