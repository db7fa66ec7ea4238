"""Turning (prompt, completion) pairs into token ids, shared by training and scoring.

Training and evaluation both go through :func:`encode_example`, so a completion is
tokenised the same way when the model learns it and when it is scored.

Chat models: :func:`use_chat_template` marks a tokenizer that has a chat template, and
from then on every prompt is rendered as one user message of that template (training,
scoring and generation alike), completions lose their leading whitespace (they start
the assistant's turn) and training completions end with the template's end-of-turn
token. An unmarked tokenizer keeps the plain-text behaviour. ``--chat-template FILE``
gives a tokenizer the template in a Jinja file (a model without one can then be used
with chat data; the saved tokenizer keeps it).

A text row (prompt :data:`~molf.tasks.base.NO_PROMPT`) is plain text whatever the
tokenizer: never in a chat template, the loss on every token.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from molf.errors import MolfError
from molf.tasks.base import NO_PROMPT, Prompt

IGNORE_INDEX = -100  # label value that the loss (and scoring) skips
CHAT_TEMPLATE_MODES = ("auto", "none")
CHAT_ATTR = "molf_chat"  # the mark :func:`use_chat_template` sets on a tokenizer instance
TEMPLATE_FILE_ATTR = "molf_chat_template_file"  # the --chat-template FILE a template came from
_PROBE = "MOLFPROBEANSWER"  # assistant text used to find the end-of-turn token


@dataclass(frozen=True)
class ChatFormat:
    """How a marked tokenizer frames prompts (stored as ``tokenizer.molf_chat``).

    ``end_of_turn_id`` closes the assistant's turn in the template (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``...): training completions end with it and
    generation stops at it. It is the tokenizer's EOS when the template shows none.
    """

    end_of_turn_id: int | None


def use_chat_template(tokenizer: Any, mode: str) -> bool:
    """Mark ``tokenizer`` so that prompts go through its chat template; True if they will.

    ``mode`` is ``"auto"`` (use the template when ``tokenizer.chat_template`` is set),
    ``"none"`` (plain text; removes an earlier mark) or the path of a Jinja file, which
    becomes ``tokenizer.chat_template`` and is used. The mark is the attribute
    ``tokenizer.molf_chat`` (a :class:`ChatFormat`); it lives on this instance only
    and is not saved with the tokenizer.
    """
    if mode not in CHAT_TEMPLATE_MODES:
        tokenizer.chat_template = read_chat_template(mode)
        setattr(tokenizer, TEMPLATE_FILE_ATTR, mode)
    active = mode != "none" and bool(getattr(tokenizer, "chat_template", None))
    if active:
        render_chat(tokenizer, [{"role": "user", "content": "hi"}])  # a broken one fails here
        setattr(tokenizer, CHAT_ATTR, ChatFormat(_end_of_turn_id(tokenizer)))
    elif hasattr(tokenizer, CHAT_ATTR):
        delattr(tokenizer, CHAT_ATTR)
    return active


def read_chat_template(path: str) -> str:
    """The Jinja text of the ``--chat-template`` file ``path``; a MolfError when it is
    neither auto, none nor a readable, non-empty file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MolfError(
            f"--chat-template: {path!r} is neither one of {', '.join(CHAT_TEMPLATE_MODES)} "
            "nor an existing file; pass auto, none or the path of a Jinja chat template"
        )
    try:
        template = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MolfError(f"--chat-template {path}: cannot read it as UTF-8 text ({e})") from None
    if not template.strip():
        raise MolfError(f"--chat-template {path}: the file is empty; put a Jinja template in it")
    return template


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The chat template's text for ``messages`` followed by the assistant's opening; a
    template that fails (a syntax error, ``raise_exception``, a missing key) is a
    MolfError naming the template's file and line and the way out."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja2's TemplateError family, or Python errors inside it
        raise MolfError(
            f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')} "
            f"fails ({_template_where(tokenizer, e)}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no message'}); fix the template, or "
            "use raw text with --chat-template none"
        ) from None


def _template_where(tokenizer: Any, error: Exception) -> str:
    """Where a chat template failed: ``DIR/chat_template.jinja:LINE`` when the template is
    that file, else ``DIR/tokenizer_config.json, chat_template line LINE``."""
    line = getattr(error, "lineno", None)  # TemplateSyntaxError
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_filename == "<template>":  # jinja maps frames to template lines
            line = lineno
    given = getattr(tokenizer, TEMPLATE_FILE_ATTR, None)
    if given is not None:
        return f"{given}:{line}" if line else given
    directory = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    if (directory / "chat_template.jinja").is_file():
        where = str(directory / "chat_template.jinja")
        return f"{where}:{line}" if line else where
    where = f"{directory / 'tokenizer_config.json'}, chat_template"
    return f"{where} line {line}" if line else where


def chat_format(tokenizer: Any) -> ChatFormat | None:
    """The tokenizer's :class:`ChatFormat` when it is marked, else None (plain text)."""
    return getattr(tokenizer, CHAT_ATTR, None)


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the template puts right after an assistant message, else EOS."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}],
            tokenize=False,
        )
    except Exception:  # templates may refuse this exchange (jinja raise_exception)
        return tokenizer.eos_token_id
    after = text[text.rfind(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    # a special token vanishes when decoded with skip_special_tokens
    if ids and tokenizer.decode(ids[:1], skip_special_tokens=True) == "":
        return int(ids[0])
    return tokenizer.eos_token_id


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Prompt token ids: for a marked tokenizer (:func:`use_chat_template`), the prompt as
    one user message of the chat template (a conversation: its messages) followed by
    the assistant's opening; else the text with the tokenizer's default special tokens
    (BOS if it adds one). A conversation needs a marked tokenizer.

    The rendered template is tokenised without special tokens: any BOS is in its text.
    """
    chat = chat_format(tokenizer)
    if chat is None and not isinstance(prompt, str):
        raise MolfError(
            "chat data (messages) needs the model's chat template, and this tokenizer has "
            "none or --chat-template none was given: use a chat model, or plain "
            '{"prompt", "completion"} text'
        )
    if chat is None:
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = render_chat(tokenizer, list(messages))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_example(
    tokenizer: Any,
    prompt: Prompt,
    completion: str,
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on prompt tokens) for one pair.

    The completion is tokenised on its own without special tokens, plus EOS when
    ``add_eos`` (training: the model learns to stop). With a chat template (see
    :func:`use_chat_template`) the completion is the assistant's reply: its leading
    whitespace is dropped and it ends with the end-of-turn token instead.

    Over ``max_length`` the prompt loses tokens from its left; completion tokens are
    never dropped for it. A completion that alone reaches ``max_length`` is cut from the
    right, keeping one prompt token so that every kept completion token has a context
    to be predicted from.

    A text row (``prompt`` :data:`~molf.tasks.base.NO_PROMPT`) is :func:`encode_text`.
    """
    if prompt == NO_PROMPT:
        return encode_text(tokenizer, completion, max_length, add_eos)
    head = prompt_ids(tokenizer, prompt)
    chat = chat_format(tokenizer)
    if chat is not None:
        completion = completion.lstrip()
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    end = tokenizer.eos_token_id if chat is None else chat.end_of_turn_id
    if add_eos and end is not None:
        tail.append(end)
    if max_length is not None and len(head) + len(tail) > max_length:
        if max_length < 2:
            raise MolfError(f"max_length must be at least 2, got {max_length}")
        tail = tail[: max_length - 1]
        head = head[len(head) + len(tail) - max_length :]
    return {"input_ids": head + tail, "labels": [IGNORE_INDEX] * len(head) + tail}


def encode_text(
    tokenizer: Any, text: str, max_length: int | None = None, add_eos: bool = True
) -> dict[str, list[int]]:
    """A text row: ``text`` with the tokenizer's special tokens (BOS if it adds one), plus
    EOS when ``add_eos``, cut from the right at ``max_length``; never in a chat template.
    Every token is labelled but the first, which nothing before it predicts."""
    if max_length is not None and max_length < 2:
        raise MolfError(f"max_length must be at least 2, got {max_length}")
    ids = list(tokenizer(text)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids = ids[:max_length]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, plus the mask."""
    width = max(len(item["input_ids"]) for item in batch)
    ids, labels, mask = [], [], []
    for item in batch:
        n, pad = len(item["input_ids"]), width - len(item["input_ids"])
        ids.append(item["input_ids"] + [pad_id] * pad)
        labels.append(item["labels"] + [IGNORE_INDEX] * pad)
        mask.append([1] * n + [0] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


def ensure_pad_token(tokenizer: Any) -> int:
    """The pad id, setting pad to EOS (or UNK) when the tokenizer has none.

    Padding is always masked out, so reusing EOS is harmless; many causal-LM
    tokenizers ship without a pad token.
    """
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise MolfError(
                "the tokenizer has no pad, eos or unk token; set tokenizer.pad_token first"
            )
        tokenizer.pad_token = fallback
    return int(tokenizer.pad_token_id)
