"""Scoring and greedy generation with a causal LM, batched, for every task's metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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

# A prompt's second longer completion is scored from the prompt's cache (a second
# forward pass) only when the prompt tokens that saves feeding again reach this share of
# the first pass's padded positions; else it gets a row of its own in the first pass. A
# forward pass has a cost of its own (SmolLM2-135M on one CPU thread: about 60-80
# positions' worth; on a GPU, small batches are launch-bound and it costs more), and on
# CounterFact with SmolLM2 sharing every prompt measured 8-10% slower than rows
# (benchmarks/b6_eval_scoring.py). 0: share wherever the cache allows.
SHARE_MIN_SAVING = 0.5


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
    *,
    share_prefix: bool = True,
) -> list[float]:
    """Mean token log-probability of each completion given its prompt.

    The mean (not the sum) keeps answers of different token lengths comparable.
    Pairs are encoded as for training (without EOS) and scored by
    :func:`score_completions`: each distinct prompt runs through the model once, with
    its longest completion; its one-token completions are read from that pass and its
    other longer ones from its cached keys and values (``share_prefix=False``, or a
    model without a cache: a row of prompt and completion each). Every score equals
    (up to float rounding) scoring the pair alone. ``batch_size`` counts distinct
    prompts per forward pass.

    A progress bar shows on a terminal (tqdm's ``disable=None``).
    """
    scores = score_completions(
        model, tokenizer, prompts, completions, batch_size, share_prefix=share_prefix
    )
    return [s.mean for s in scores]


@dataclass(frozen=True)
class CompletionScore:
    """Log-probs of one completion after its prompt (<= 0)."""

    mean: float  # mean log-prob of the completion's tokens
    first: float  # log-prob of its first token
    alternatives: tuple[float, ...] = ()  # the asked tokens' log-probs in place of the first


def score_completions(
    model: Any,
    tokenizer: Any,
    prompts: list[Any],
    completions: list[str],
    batch_size: int = 8,
    *,
    alternatives: list[list[int]] | None = None,
    share_prefix: bool = True,
    progress: Any = None,
) -> list[CompletionScore]:
    """A :class:`CompletionScore` per ``(prompt, completion)`` pair.

    Pairs are encoded as for training (:func:`encode_example`, no EOS), so a prompt
    over the context loses tokens from its left. ``alternatives[i]`` (token ids) are
    read from the distribution that predicts pair ``i``'s first token (e.g. a rival
    answer's first token, for first-token contests).

    Pairs with the same prompt tokens share work (each distinct prompt runs once, its
    completions read from its row or its cached keys and values: :class:`_Scorer`);
    every score equals (up to float rounding) scoring the pair alone. Distinct prompts
    are batched ``batch_size`` at a time, shortest first. A progress bar shows on a
    terminal (tqdm's ``disable=None``); ``progress``, a caller's bar over several calls,
    is advanced by the number of pairs scored instead.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if alternatives is not None and len(alternatives) != len(prompts):
        raise ValueError(f"{len(prompts)} pairs but {len(alternatives)} alternatives")
    heads, tails = _encode_pairs(tokenizer, prompts, completions, context_length(model))
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt tokens -> its pairs
    for index, head in enumerate(heads):
        groups.setdefault(head, []).append(index)
    ordered = sorted(groups.items(), key=lambda group: len(group[0]))
    pad_id = ensure_pad_token(tokenizer)
    asked = alternatives or [[] for _ in prompts]
    scores: dict[int, CompletionScore] = {}
    run = _Scorer(model, pad_id, cached=share_prefix and _takes_cache(model))
    with inference(model):
        starts = range(0, len(ordered), batch_size)
        for start in starts if progress else tqdm(starts, "scoring", unit="batch", disable=None):
            batch = ordered[start : start + batch_size]
            scores.update(
                run(
                    [list(head) for head, _ in batch],
                    [[(i, tails[i], asked[i]) for i in members] for _, members in batch],
                )
            )
            if progress is not None:
                progress.update(sum(len(members) for _, members in batch))
    return [scores[i] for i in range(len(prompts))]


def _encode_pairs(
    tokenizer: Any, prompts: list[Any], completions: list[str], limit: int
) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    """Each pair encoded as for training (no EOS, cut at ``limit`` from the left): its
    prompt tokens and its completion tokens; a completion without tokens is a MolfError."""
    heads: list[tuple[int, ...]] = []
    tails: list[list[int]] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        item = encode_example(tokenizer, prompt, completion, max_length=limit, add_eos=False)
        tail = [t for t in item["labels"] if t != IGNORE_INDEX]
        if not tail:
            raise MolfError(f"completion {completion!r} has no tokens to score; make it non-empty")
        heads.append(tuple(item["input_ids"][: len(item["input_ids"]) - len(tail)]))
        tails.append(tail)
    return heads, tails


def _takes_cache(model: Any) -> bool:
    """Whether the model's config has ``use_cache`` (its value does not matter: gradient
    checkpointing sets it False for training, and scoring passes ``use_cache=True``)."""
    return hasattr(getattr(model, "config", None), "use_cache")


def _attention_window(model: Any) -> int | None:
    """The smallest sliding-window or attention-chunk size in the model's (text) config,
    taken as a bound on every layer; ``None`` when there is none."""
    config = getattr(model, "config", None)
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    sizes = [getattr(config, key, None) for key in ("sliding_window", "attention_chunk_size")]
    return min((s for s in sizes if isinstance(s, int) and s > 0), default=None)


_Pair = tuple[int, list[int], list[int]]  # (index, completion tokens, alternative first tokens)
_Row = tuple[list[int], int, list[_Pair]]  # (ids, tokens scored at its end, pairs read there)


class _Scorer:
    """Scores one batch of distinct prompts and their pairs (see :func:`score_completions`):

    - each distinct prompt gets one left-padded row (positions from the mask) of the
      prompt and its longest completion but that completion's last token; the
      vocabulary is projected only at the row's last positions (``logits_to_keep``),
      which predict that completion's tokens, and the first of them also predicts the
      first token of every other completion: one-token completions cost nothing more;
    - ``share_prefix`` (the default): a prompt's other longer completions (all tokens
      but the last, right-padded) then run in one pass over the batch's cached keys and
      values (the prompt's row gathered once per completion, the first completion's
      positions masked out), so the prompt is run once. Under a sliding window or
      attention chunks this is done only where the row and the completion fit in the
      window (elsewhere the extra distance would change what is attended to); a model
      whose config has no ``use_cache``, or that returns no cache, takes rows instead;
    - rows: each other longer completion gets a row of its own, prompt included.

    A batch whose prompts each have at most one longer completion is thus one forward
    pass either way. The pass after the cache runs only where the prompt tokens it
    saves feeding again reach ``SHARE_MIN_SAVING`` of the first pass's padded positions
    (a pass has a cost of its own); otherwise those completions take rows in the first.
    """

    def __init__(self, model: Any, pad_id: int, cached: bool) -> None:
        self.model = model
        self.pad_id = pad_id
        self.cached = cached
        self.takes_cache = _takes_cache(model)
        self.window = _attention_window(model)
        self.device = model_device(model)

    def __call__(
        self, heads: list[list[int]], members: list[list[_Pair]]
    ) -> dict[int, CompletionScore]:
        rows: list[_Row] = []  # one per prompt, then one per completion not shared
        extra: list[_Row] = []
        later: list[tuple[int, int, _Pair]] = []  # (its prompt's row, prompt length, pair)
        for head, group in zip(heads, members, strict=True):
            longer = [pair for pair in group if len(pair[1]) > 1]
            single = [pair for pair in group if len(pair[1]) == 1]
            if not longer:
                rows.append((head, 1, single))
                continue
            # the longest rides in the prompt's row; the others, if shared, in one pass
            # after the cache (narrower for it)
            first = max(longer, key=lambda pair: len(pair[1]))
            rest = [pair for pair in longer if pair is not first]
            rows.append((head + first[1][:-1], len(first[1]), [first, *single]))
            if rest and self.cached and self._fits(len(head), first, rest):
                later += [(len(rows) - 1, len(head), pair) for pair in rest]
            else:
                extra += [(head + pair[1][:-1], len(pair[1]), [pair]) for pair in rest]
        if later and not self._pays(rows + extra, later):
            extra += [(rows[r][0][:h] + pair[1][:-1], len(pair[1]), [pair]) for r, h, pair in later]
            later = []
        scored, out, inputs, firsts = self._rows(rows + extra, use_cache=bool(later))
        if later:
            shared = self._from_cache(out, inputs, rows, later, firsts)
            if shared is None:  # the model returned no cache: rows from now on
                self.cached = False
                shared = self._rows(
                    [(rows[r][0][:h] + pair[1][:-1], len(pair[1]), [pair]) for r, h, pair in later]
                )[0]
            scored.update(shared)
        return scored

    @staticmethod
    def _pays(rows: list[_Row], later: list[tuple[int, int, _Pair]]) -> bool:
        """Whether a pass after the cache saves enough: the prompt tokens it keeps from
        being fed again reach ``SHARE_MIN_SAVING`` times the first pass's positions."""
        positions = len(rows) * max(len(ids) for ids, _, _ in rows)
        return sum(head for _, head, _ in later) >= SHARE_MIN_SAVING * positions

    def _fits(self, head: int, first: _Pair, rest: list[_Pair]) -> bool:
        """Whether the later completions may attend to the cached prompt row with the
        first completion's tokens in it (masked): under a sliding window or attention
        chunks, only when the whole row and the longest later completion fit in one
        window, so that the extra distance changes nothing."""
        longest = max(len(pair[1]) for pair in rest)
        return self.window is None or head + len(first[1]) + longest <= self.window

    def _rows(
        self, rows: list[_Row], use_cache: bool = False
    ) -> tuple[dict[int, CompletionScore], Any, dict[str, torch.Tensor], list[torch.Tensor]]:
        """One left-padded pass over ``rows`` (vocabulary at the scored positions only):
        the scores of the pairs read from them, the model's output, its inputs, and
        each row's first-token distribution (log-probs after its prompt)."""
        width = max(len(ids) for ids, _, _ in rows)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in rows])
        inputs = {
            "input_ids": torch.tensor([[self.pad_id] * (width - len(i)) + i for i, _, _ in rows]),
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        }
        keep = max(n for _, n, _ in rows)
        flag = {"use_cache": use_cache} if self.takes_cache else {}
        out = self._forward(inputs, logits_to_keep=keep, **flag)
        logp = out.logits.float().log_softmax(-1)  # [rows, keep, vocab]
        scored: dict[int, CompletionScore] = {}
        firsts = []
        for scores, (_, n, pairs) in zip(logp, rows, strict=True):
            at = scores[keep - n :]  # position k predicts the row's completion token k
            firsts.append(at[0])
            for index, tail, asked in pairs:
                scored[index] = _score(_picked(at[: len(tail)], tail), at[0], asked)
        return scored, out, inputs, firsts

    def _from_cache(
        self,
        out: Any,
        inputs: dict[str, torch.Tensor],
        rows: list[_Row],
        later: list[tuple[int, int, _Pair]],
        firsts: list[torch.Tensor],
    ) -> dict[int, CompletionScore] | None:
        """The later completions (all tokens but the last, right-padded) in one pass
        over the cached rows of their prompts (gathered once per completion), with the
        row's first completion masked out; ``None`` when the model returned no cache."""
        # transformers 5 names the returned cache and the argument ``cache``, 4.x
        # ``past_key_values``
        name = next((k for k in ("cache", "past_key_values") if out.get(k) is not None), None)
        cache = out[name] if name is not None else None
        if cache is None or not callable(getattr(cache, "batch_select_indices", None)):
            return None
        which = torch.tensor([r for r, _, _ in later])
        prefix = inputs["attention_mask"][which].clone()
        for k, (r, head, _) in enumerate(later):
            packed = len(rows[r][0]) - head  # the first completion's tokens, at the row's end
            prefix[k, prefix.shape[1] - packed :] = 0
        fed = [pair[1][:-1] for _, _, pair in later]
        width = max(len(ids) for ids in fed)
        step_inputs = {
            "input_ids": torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids in fed]),
            "attention_mask": torch.cat(
                [prefix, torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in fed])], -1
            ),
            "position_ids": torch.tensor(
                [[head + k for k in range(width)] for _, head, _ in later]
            ),
        }
        cache.batch_select_indices(which.to(self.device))
        logits = self._forward(step_inputs, use_cache=True, **{name: cache}).logits
        logp = logits.float().log_softmax(-1)  # [completions, width, vocab]
        scored = {}
        for (r, _, (index, tail, asked)), scores in zip(later, logp, strict=True):
            tokens = torch.cat(
                [_picked(firsts[r][None], tail[:1]), _picked(scores[: len(tail) - 1], tail[1:])]
            )
            scored[index] = _score(tokens, firsts[r], asked)
        return scored

    def _forward(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        return self.model(**{k: v.to(self.device) for k, v in inputs.items()}, **kwargs)


def _picked(logp: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """``logp[k, tokens[k]]`` for each k."""
    index = torch.tensor(tokens, device=logp.device).unsqueeze(-1)
    return logp.gather(-1, index).squeeze(-1)


def _score(tokens: torch.Tensor, first: torch.Tensor, asked: list[int]) -> CompletionScore:
    alt = first[torch.tensor(asked, dtype=torch.long, device=first.device)]
    values = torch.cat([tokens.mean().unsqueeze(0), tokens[:1], alt]).tolist()
    return CompletionScore(values[0], values[1], tuple(values[2:]))


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
