"""Scoring and greedy generation with a causal LM, batched, for every task's metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm

from molf.errors import MolfError
from molf.tasks.encoding import (
    IGNORE_INDEX,
    chat_format,
    collate,
    encode_example,
    ensure_pad_token,
    prompt_ids,
)


@contextmanager
def inference(model: Any) -> Iterator[None]:
    """``model.eval()`` and no gradients inside; the previous training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def context_length(model: Any) -> int | None:
    """How many positions the model was trained for, when its config says."""
    return getattr(model.config, "max_position_embeddings", None)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def completion_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 8,
) -> list[float]:
    """Mean token log-probability of each completion given its prompt.

    The mean (not the sum) keeps answers of different token lengths comparable.
    Pairs are encoded as for training (without EOS) and right-padded in batches;
    the attention mask keeps each score equal (up to float rounding) to scoring the
    pair alone. A progress bar shows on a terminal (tqdm's ``disable=None``).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    pad_id = ensure_pad_token(tokenizer)
    encoded = [
        encode_example(tokenizer, p, c, max_length=context_length(model), add_eos=False)
        for p, c in zip(prompts, completions, strict=True)
    ]
    for item, completion in zip(encoded, completions, strict=True):
        if all(label == IGNORE_INDEX for label in item["labels"]):
            raise MolfError(f"completion {completion!r} has no tokens to score; make it non-empty")
    scores: list[float] = []
    with inference(model):
        for start in tqdm(
            range(0, len(encoded), batch_size), desc="scoring", unit="batch", disable=None
        ):
            batch = collate(encoded[start : start + batch_size], pad_id)
            batch = {k: v.to(model_device(model)) for k, v in batch.items()}
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .float()
            )
            targets = batch["labels"][:, 1:]
            scored = targets != IGNORE_INDEX
            picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            token_logp = (picked - logits.logsumexp(-1)) * scored
            scores.extend((token_logp.sum(-1) / scored.sum(-1)).tolist())
    return scores


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of ``prompts`` (only the new text), each stopping at EOS
    (or any id of :func:`stop_ids`, such as a chat template's end of turn).

    Prompts are left-padded so every row's new tokens start at the same position;
    a prompt too long for the model's context loses tokens from its left. A progress
    bar shows on a terminal.
    """
    pad_id = ensure_pad_token(tokenizer)
    stops = stop_ids(model, tokenizer)
    limit = context_length(model)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    if limit is not None:
        keep = max(1, limit - max_new_tokens)
        encoded = [ids[-keep:] for ids in encoded]
    texts: list[str] = []
    with inference(model):
        for start in tqdm(
            range(0, len(encoded), batch_size), desc="generating", unit="batch", disable=None
        ):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in chunk])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
            out = model.generate(
                input_ids=input_ids.to(model_device(model)),
                attention_mask=mask.to(model_device(model)),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=stops or None,
            )
            for row in out[:, width:].tolist():
                end = next((i for i, token in enumerate(row) if token in stops), len(row))
                texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS, the model's configured ones (chat models often have several)
    and, for a tokenizer marked by ``use_chat_template``, the template's end of turn."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    chat = chat_format(tokenizer)
    turn_end = chat.end_of_turn_id if chat is not None else None
    return sorted({i for i in [*configured, tokenizer.eos_token_id, turn_end] if i is not None})
