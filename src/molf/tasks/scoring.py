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
    Pairs are encoded as for training (without EOS). Two savings that leave every
    score equal (up to float rounding) to scoring the pair alone:

    - pairs whose completion is one token are grouped by prompt: one forward pass of
      the prompt scores all of them (multiple choice: one pass per question, not four);
    - rows are left-padded (positions taken from the attention mask), so every row's
      scored tokens sit at the end and the vocabulary projection runs only there
      (``logits_to_keep``), not over the whole prompt.

    A progress bar shows on a terminal (tqdm's ``disable=None``).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    encoded = [
        encode_example(tokenizer, p, c, max_length=context_length(model), add_eos=False)
        for p, c in zip(prompts, completions, strict=True)
    ]
    targets: list[list[int]] = []
    for item, completion in zip(encoded, completions, strict=True):
        target = [t for t in item["labels"] if t != IGNORE_INDEX]
        if not target:
            raise MolfError(f"completion {completion!r} has no tokens to score; make it non-empty")
        targets.append(target)
    # One sequence per distinct context: a single-token pair is scored from its prompt.
    contexts: dict[tuple[int, ...], int] = {}
    sequences: list[tuple[list[int], int]] = []  # (input ids, number of scored tokens)
    where: list[int] = []
    for item, target in zip(encoded, targets, strict=True):
        ids = item["input_ids"]
        key = tuple(ids[:-1]) if len(target) == 1 else tuple(ids) + (-1,)
        if key not in contexts:
            contexts[key] = len(sequences)
            sequences.append((ids[:-1], 0) if len(target) == 1 else (ids, len(target)))
        where.append(contexts[key])
    logprobs = _tail_logprobs(model, tokenizer, sequences, batch_size)
    scores = []
    for index, target in zip(where, targets, strict=True):
        rows = logprobs[index]  # [scored positions, vocab] for this sequence
        picked = rows[-len(target) :].gather(-1, torch.tensor(target).unsqueeze(-1))
        scores.append(float(picked.mean()))
    return scores


def _tail_logprobs(
    model: Any, tokenizer: Any, sequences: list[tuple[list[int], int]], batch_size: int
) -> list[torch.Tensor]:
    """For each ``(ids, n)``: next-token log-probs at the positions that predict the
    last ``n`` tokens of ``ids`` (``n = 0``: the token after ``ids``), [n or 1, vocab]."""
    pad_id = ensure_pad_token(tokenizer)
    device = model_device(model)
    out: list[torch.Tensor] = []
    with inference(model):
        for start in tqdm(
            range(0, len(sequences), batch_size), desc="scoring", unit="batch", disable=None
        ):
            chunk = sequences[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            keep = max(max(n, 1) for _, n in chunk) + 1
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids, _ in chunk])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in chunk])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=keep,
            ).logits.float()
            logp = logits.log_softmax(-1).cpu()
            for row, (_, n) in zip(logp, chunk, strict=True):
                # positions [-n-1, -1) predict the last n tokens; n = 0: the last position
                out.append(row[-1:] if n == 0 else row[-n - 1 : -1])
    return out


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
