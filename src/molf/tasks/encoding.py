"""Turning (prompt, completion) pairs into token ids, shared by training and scoring.

Training and evaluation both go through :func:`encode_example`, so a completion is
tokenised the same way when the model learns it and when it is scored.
"""

from __future__ import annotations

from typing import Any

import torch

from molf.errors import MolfError

IGNORE_INDEX = -100  # label value that the loss (and scoring) skips


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids with the tokenizer's default special tokens (BOS if it adds one)."""
    return list(tokenizer(prompt)["input_ids"])


def encode_example(
    tokenizer: Any,
    prompt: str,
    completion: str,
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (-100 on prompt tokens) for one pair.

    The completion is tokenised on its own without special tokens, plus EOS when
    ``add_eos`` (training: the model learns to stop). Over ``max_length`` the prompt
    loses tokens from its left; completion tokens are never dropped for it. A
    completion that alone reaches ``max_length`` is cut from the right, keeping one
    prompt token so that every kept completion token has a context to be predicted from.
    """
    head = prompt_ids(tokenizer, prompt)
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    if max_length is not None and len(head) + len(tail) > max_length:
        if max_length < 2:
            raise MolfError(f"max_length must be at least 2, got {max_length}")
        tail = tail[: max_length - 1]
        head = head[len(head) + len(tail) - max_length :]
    return {"input_ids": head + tail, "labels": [IGNORE_INDEX] * len(head) + tail}


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
