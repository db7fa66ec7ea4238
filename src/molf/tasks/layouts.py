"""The row layouts of the user's own data (the jsonl task) and their column mapping.

A row is read by the first layout whose key it has, in this order:

- messages: ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant",
  "content": ...}]}``, a conversation ending with the assistant's reply: the reply is
  the completion (the loss is taken on it alone), the earlier turns its prompt,
  rendered with the chat template. Its messages may also be ShareGPT's
  ``{"from", "value"}``;
- sharegpt: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt",
  "value": ...}]}``, read as messages: ``human`` is the user, ``gpt`` the assistant,
  ``system`` the system prompt; it ends with a ``gpt`` turn;
- prompt/completion: ``{"prompt": "...", "completion": "..."}`` (text, used as written),
  or TRL's conversational ``{"prompt": [messages], "completion": [one assistant
  message]}``;
- alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``: the prompt
  is the instruction, followed on a new line by the input when there is one; the output
  is the completion, starting on a new line (in plain text; a chat template makes it
  the assistant's reply, without the newline);
- text: ``{"text": "..."}``: plain text with the loss on every token, never wrapped in a
  chat template (:data:`~molf.tasks.base.NO_PROMPT`).

:class:`Fields` renames the keys of the prompt/completion and messages layouts (the
``--prompt-field``, ``--completion-field`` and ``--messages-field`` flags; a dot
follows a nested object, e.g. ``data.question``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from molf.tasks.base import NO_PROMPT, Example
from molf.tasks.sources import Origin, text

SHAREGPT_FIELD = "conversations"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ALPACA_FIELDS = ("instruction", "input", "output")
TEXT_FIELD = "text"


@dataclass(frozen=True)
class Fields:
    """The keys of the prompt/completion and messages layouts in the user's rows."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def parse_pair_row(row: dict[str, Any], origin: Origin, fields: Fields = Fields()) -> Example:
    """An Example from a row of any accepted layout (see the module); a row of none of
    them is a DataError listing the layouts with one example each."""
    if _has(row, fields.messages):
        return conversation(row, fields.messages, origin)
    if SHAREGPT_FIELD in row:
        return conversation(row, SHAREGPT_FIELD, origin)
    if _has(row, fields.prompt):
        return _prompt_completion(row, fields, origin)
    if ALPACA_FIELDS[0] in row:
        return _alpaca(row, origin)
    if TEXT_FIELD in row:
        return Example(NO_PROMPT, text(row, TEXT_FIELD, origin))
    raise origin.error("<row>", unknown_layout(row, fields))


def _has(row: dict[str, Any], name: str) -> bool:
    """Whether ``row`` has the (dotted) key ``name``."""
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def _get(row: dict[str, Any], name: str) -> Any:
    """``row``'s (dotted) key ``name``, None when missing."""
    value: Any = row
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def conversation(row: dict[str, Any], name: str, origin: Origin) -> Example:
    """A conversation ending with an assistant message: the earlier turns are the prompt."""
    messages = _messages(row, name, origin)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise origin.error(name, "must end with an assistant message, after at least one other")
    return Example(messages[:-1], messages[-1]["content"])


def _prompt_completion(row: dict[str, Any], fields: Fields, origin: Origin) -> Example:
    """Text prompt and completion, or TRL's conversational prompt and completion."""
    if isinstance(_get(row, fields.prompt), list):
        reply = _messages(row, fields.completion, origin)
        if len(reply) != 1 or reply[0]["role"] != "assistant":
            raise origin.error(fields.completion, "must be a list of one assistant message")
        return Example(_messages(row, fields.prompt, origin), reply[0]["content"])
    return Example(text(row, fields.prompt, origin), text(row, fields.completion, origin))


def _alpaca(row: dict[str, Any], origin: Origin) -> Example:
    """Instruction (and input on a new line) as the prompt, the output as the completion."""
    instruction, extra = text(row, "instruction", origin), row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise origin.error("input", f"must be a string when given, got {extra!r}")
    prompt = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    output = text(row, "output", origin)
    return Example(prompt, output if output[0].isspace() else "\n" + output)


def _messages(row: dict[str, Any], name: str, origin: Origin) -> tuple[dict[str, str], ...]:
    """A non-empty list of messages as ``{"role", "content"}`` (ShareGPT's ``{"from",
    "value"}`` converted)."""
    value = _get(row, name)
    if not isinstance(value, list) or not value:
        raise origin.error(name, f"must be a non-empty list of messages, got {value!r}")
    return tuple(_message(item, name, origin) for item in value)


def _message(item: Any, name: str, origin: Origin) -> dict[str, str]:
    """One message: ``{"role", "content"}`` strings, or ShareGPT's ``from``/``value``."""
    if isinstance(item, dict) and "from" in item and "role" not in item:
        role = SHAREGPT_ROLES.get(item["from"])
        if role is None or not isinstance(item.get("value"), str):
            raise origin.error(
                name,
                f'a ShareGPT turn needs "from" ({", ".join(SHAREGPT_ROLES)}) and a string '
                f'"value", got {item!r}',
            )
        return {"role": role, "content": item["value"]}
    if not (
        isinstance(item, dict)
        and isinstance(item.get("role"), str)
        and isinstance(item.get("content"), str)
    ):
        raise origin.error(
            name,
            'every message needs string "role" and "content" (or ShareGPT\'s "from" and '
            f'"value"), got {item!r}',
        )
    return {"role": item["role"], "content": item["content"]}


def layout_examples(fields: Fields = Fields()) -> dict[str, dict[str, Any]]:
    """One example row of each accepted layout, under the keys ``fields`` names."""
    return {
        "prompt/completion": {fields.prompt: "2+2=", fields.completion: " 4"},
        "messages": {
            fields.messages: [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ]
        },
        "sharegpt": {
            SHAREGPT_FIELD: [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]
        },
        "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        "text": {TEXT_FIELD: "Once upon a time..."},
    }


def unknown_layout(row: dict[str, Any], fields: Fields) -> str:
    """The problem of a row of no accepted layout: its keys, and each layout's example."""
    examples = "; ".join(
        f"{name} {json.dumps(example)}" for name, example in layout_examples(fields).items()
    )
    keys = ", ".join(map(repr, row)) or "none"
    return (
        f"no accepted layout has these keys ({keys}); use one of: {examples}; or name your "
        "columns with --prompt-field and --completion-field, or --messages-field"
    )
