"""Scoring and generation with the real stories260k model."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_model
from transformers.modeling_outputs import CausalLMOutput

from molf.tasks import get_task, scoring
from molf.tasks.encoding import CHAT_ATTR, ChatFormat, encode_example, use_chat_template
from molf.tasks.fact import contest_scores
from molf.tasks.scoring import (
    completion_logprobs,
    context_length,
    generate,
    inference,
    score_completions,
    stop_ids,
)

PROMPTS = ["Once upon a time", "The cat sat on the", "Lily went to the park and saw a big", "Tom"]
COMPLETIONS = [" there was", " mat", " dog and she was happy", " ran away quickly to his mom"]


def slow_logprob(model, tokenizer, prompt: str, completion: str) -> float:
    """Mean log-prob of the completion tokens from one unpadded forward pass."""
    item = encode_example(tokenizer, prompt, completion, add_eos=False)
    ids = torch.tensor([item["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    picked = [
        logp[pos - 1, token].item()
        for pos, (token, label) in enumerate(zip(item["input_ids"], item["labels"], strict=True))
        if label != -100
    ]
    return sum(picked) / len(picked)


def test_batched_scores_equal_unbatched_and_a_direct_computation(tiny) -> None:
    model, tokenizer = tiny
    batched = completion_logprobs(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=8)
    one_by_one = [
        completion_logprobs(model, tokenizer, [p], [c], batch_size=1)[0]
        for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    direct = [
        slow_logprob(model, tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    # padding changes float32 summation order only: equal to rounding
    assert torch.allclose(torch.tensor(batched), torch.tensor(one_by_one), atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(batched), torch.tensor(direct), atol=1e-5, rtol=0)
    assert all(s < 0 for s in batched)


def test_choices_sharing_a_prompt_score_as_if_alone(tiny) -> None:
    """Multiple choice: one-token options share one forward pass of their prompt; longer
    options in the same call take the per-pair path. Both equal the direct computation."""
    model, tokenizer = tiny
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]
    options = [" B", " C", " D", " A"] * 3  # " A" is two tokens in this tokenizer
    got = completion_logprobs(model, tokenizer, prompts, options, batch_size=3)
    want = [slow_logprob(model, tokenizer, p, c) for p, c in zip(prompts, options, strict=True)]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)


def test_likely_continuation_scores_higher(tiny) -> None:
    model, tokenizer = tiny
    likely, unlikely = completion_logprobs(
        model, tokenizer, ["Once upon a time"] * 2, [" there was", " xylophone qz"]
    )
    assert likely > unlikely


def test_generation_is_greedy_new_text_the_same_batched_or_alone(tiny) -> None:
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8)
    alone = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert batched[0].startswith(", there was")  # the model's known greedy continuation
    assert not any(p in g for p, g in zip(PROMPTS, batched, strict=True))


def test_generation_stops_at_eos_per_row(tiny) -> None:
    model, tokenizer = tiny
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = "▁little"  # greedy "Once upon a time" goes ", there was a little girl"
    out = generate(model, stopping, ["Once upon a time", "Tom"], max_new_tokens=12)
    assert out[0] == ", there was a"
    assert "little" not in out[1] and len(out[1]) > len(out[0])  # the other row ran on


def test_generation_also_stops_at_the_models_configured_eos_ids(tiny) -> None:
    model, tokenizer = tiny
    chat_like = copy.deepcopy(model)
    little = tokenizer.convert_tokens_to_ids("\u2581little")
    chat_like.generation_config.eos_token_id = [tokenizer.eos_token_id, little]
    assert generate(chat_like, tokenizer, ["Once upon a time"], max_new_tokens=12) == [
        ", there was a"
    ]


def test_inference_runs_without_grad_in_eval_mode_and_restores_training(tiny) -> None:
    model, tokenizer = tiny
    seen = []
    hook = model.register_forward_hook(
        lambda module, args, out: seen.append((module.training, torch.is_grad_enabled()))
    )
    try:
        model.train()
        completion_logprobs(model, tokenizer, ["Tom"], [" ran"])
        generate(model, tokenizer, ["Tom"], max_new_tokens=2)
        assert model.training
        model.eval()
        with inference(model):
            pass
        assert not model.training
    finally:
        hook.remove()
        model.eval()
    assert seen and all(mode == (False, False) for mode in seen)


def test_auto_chat_template_changes_nothing_for_a_model_without_one(tiny) -> None:
    model, tokenizer = tiny
    plain = copy.deepcopy(tokenizer)
    assert tokenizer.chat_template is None
    assert use_chat_template(plain, "auto") is False
    assert completion_logprobs(model, plain, PROMPTS, COMPLETIONS) == completion_logprobs(
        model, tokenizer, PROMPTS, COMPLETIONS
    )
    assert generate(model, plain, PROMPTS, max_new_tokens=8) == generate(
        model, tokenizer, PROMPTS, max_new_tokens=8
    )


def test_generation_goes_through_the_template_and_stops_at_its_end_of_turn(tiny) -> None:
    model, tokenizer = tiny
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{{ bos_token }} {{ messages[0]['content'] | upper }}"
    assert use_chat_template(chat, "auto") is True
    assert chat.molf_chat == ChatFormat(end_of_turn_id=tokenizer.eos_token_id)
    # the model sees the rendered (upper-cased) prompt, not the plain one
    upper = [p.upper() for p in PROMPTS]
    assert generate(model, chat, PROMPTS, max_new_tokens=8) == generate(
        model, tokenizer, upper, max_new_tokens=8
    )
    chat.chat_template = "{{ bos_token }} {{ messages[0]['content'] }}"
    little = tokenizer.convert_tokens_to_ids("\u2581little")
    setattr(chat, CHAT_ATTR, ChatFormat(end_of_turn_id=little))  # as for <|im_end|>
    assert little in stop_ids(model, chat) and little not in stop_ids(model, tokenizer)
    assert generate(model, chat, ["Once upon a time"], max_new_tokens=12) == [", there was a"]


# Prompts of 3 to 112 tokens in stories260k's tokenizer (the longest over the tiny
# models' 64-position context, so it loses tokens from its left), each with completions
# of 1, 15, 2, 2 and 5 tokens.
SHARED_PROMPTS = [
    "Tom",
    "Once upon a time",
    "The cat sat on the mat and looked at the big red ball in the garden",
    "Lily went to the park. " * 12 + "Then she",
]
SHARED_COMPLETIONS = [" B", " ran away quickly to his mom", " A", " dog", " was happy and sad"]
WINDOW = 24  # Gemma-3's sliding window here: "Tom" and its two longest completions fit


def tiny_scorer(arch: str) -> torch.nn.Module:
    """A random tiny model of ``arch`` over stories260k's 512-token vocabulary, its
    weights large enough that positions and masks change every score; Gemma-3 with a
    sliding-window layer and a full-attention one."""
    kw: dict = dict(vocab_size=512, initializer_range=0.3)
    if arch == "gemma3":
        kw.update(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    return tiny_model(arch, seed=3, **kw)


def reference(model, tokenizer, prompt: str, completion: str, alternative: int):
    """(mean log-prob, first token's log-prob, ``alternative``'s log-prob in its place)
    from one forward pass of the pair alone: no padding, no batching, no cache."""
    item = encode_example(
        tokenizer, prompt, completion, max_length=context_length(model), add_eos=False
    )
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([item["input_ids"]]), use_cache=False).logits
    logp = logits[0].float().log_softmax(-1)
    at = [pos - 1 for pos, label in enumerate(item["labels"]) if label != -100]
    picked = [logp[pos, item["input_ids"][pos + 1]].item() for pos in at]
    return sum(picked) / len(picked), picked[0], logp[at[0], alternative].item()


def fed_rows(model, run) -> tuple[list[list[int]], list[list[int]]]:
    """Run ``run()`` and return the real (unpadded) token rows the model was fed: in
    passes without a cache, and in passes after a cache."""
    plain: list[list[int]] = []
    after_cache: list[list[int]] = []

    def record(module, args, kwargs) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        new = mask[:, -ids.shape[1] :].bool()  # the mask also covers a cache's positions
        cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        for row, keep in zip(ids.tolist(), new.tolist(), strict=True):
            (after_cache if cached else plain).append([t for t, k in zip(row, keep) if k])

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return plain, after_cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_shared_prompt_scores_equal_one_forward_per_pair(
    tiny, monkeypatch, arch, share_prefix
) -> None:
    """Every prompt with every completion, batched 3 prompts at a time (prompts of
    different lengths in one batch, several completions per prompt, of one and of
    several tokens), every prompt shared wherever the cache allows: each score equals
    the pair's own unpadded forward pass. Gemma-3's sliding window leaves one prompt to
    share its cache, the others take rows."""
    monkeypatch.setattr(scoring, "SHARE_MIN_SAVING", 0.0)
    _, tokenizer = tiny
    model = tiny_scorer(arch)
    prompts = [p for p in SHARED_PROMPTS for _ in SHARED_COMPLETIONS]
    completions = SHARED_COMPLETIONS * len(SHARED_PROMPTS)
    alternatives = [[7 * i % 512, 3] for i in range(len(prompts))]
    got: list = []
    _, after_cache = fed_rows(
        model,
        lambda: got.extend(
            score_completions(
                model,
                tokenizer,
                prompts,
                completions,
                batch_size=3,
                alternatives=alternatives,
                share_prefix=share_prefix,
            )
        ),
    )
    # shared after the cache: the 2-, 2- and 5-token completions of the first three
    # prompts and one 2-token one of the longest (cut to the context, its prompt differs
    # with the completion's length); under Gemma-3's window only "Tom"'s
    assert len(after_cache) == (0 if not share_prefix else 3 if arch == "gemma3" else 10)
    want = [
        [reference(model, tokenizer, p, c, a) for a in alt]
        for p, c, alt in zip(prompts, completions, alternatives, strict=True)
    ]
    close = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor([s.mean for s in got]), torch.tensor([w[0][0] for w in want]), **close
    )
    torch.testing.assert_close(
        torch.tensor([s.first for s in got]), torch.tensor([w[0][1] for w in want]), **close
    )
    torch.testing.assert_close(
        torch.tensor([s.alternatives for s in got]),
        torch.tensor([[x[2] for x in w] for w in want]),
        **close,
    )
    assert completion_logprobs(
        model, tokenizer, prompts, completions, batch_size=3, share_prefix=share_prefix
    ) == [s.mean for s in got]


def test_each_distinct_prompt_is_forwarded_once(tiny) -> None:
    """Shared: one row per distinct prompt (the prompt and its longest completion but
    its last token: the one-token completions are read from it too), then every other
    longer completion once after the cache. Not shared: a row per longer completion."""
    model, tokenizer = tiny
    prompts = [p for p in SHARED_PROMPTS[:3] for _ in SHARED_COMPLETIONS] + ["Tom"]
    completions = SHARED_COMPLETIONS * 3 + [" ran"]  # "Tom" a second time, later
    heads, tails = [], []
    for p, c in zip(prompts, completions, strict=True):
        item = encode_example(tokenizer, p, c, add_eos=False)
        tail = [t for t in item["labels"] if t != -100]
        heads.append(item["input_ids"][: -len(tail)])
        tails.append(tail)
    longest = {}
    for head, tail in zip(heads, tails, strict=True):
        longest[tuple(head)] = max(longest.get(tuple(head), []), tail[:-1], key=len)
    assert len(longest) == 3 and any(len(t) == 1 for t in tails)

    plain, after_cache = fed_rows(
        model, lambda: completion_logprobs(model, tokenizer, prompts, completions, batch_size=2)
    )
    assert sorted(plain) == sorted(list(h) + t for h, t in longest.items())  # each prompt once
    others = [t[:-1] for h, t in zip(heads, tails, strict=True) if len(t) > 1]
    for tail in longest.values():
        others.remove(tail)
    assert sorted(after_cache) == sorted(others)

    plain, after_cache = fed_rows(
        model,
        lambda: completion_logprobs(
            model, tokenizer, prompts, completions, batch_size=2, share_prefix=False
        ),
    )
    assert not after_cache
    rows = [h + t[:-1] for h, t in zip(heads, tails, strict=True) if len(t) > 1]
    assert sorted(plain) == sorted(rows)  # the one-token ones ride on their prompt's rows


def test_a_second_pass_runs_only_where_it_saves_enough(tiny, monkeypatch) -> None:
    """CounterFact-like: eight prompts, one with two longer answers. Feeding that prompt
    again costs less than a second pass, so the batch is one pass of rows; with many
    prompts of two longer answers, the cache is used."""
    model, tokenizer = tiny
    prompts = [f"Story {i}: once upon a time" for i in range(8)]
    pairs = [(p, c) for p in prompts for c in (" B", " A")]  # one-token " B", two-token " A"
    pairs.append((prompts[0], " dog"))
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        got = completion_logprobs(model, tokenizer, *map(list, zip(*pairs, strict=True)))
        assert len(calls) == 1
        plain, after_cache = fed_rows(
            model,
            lambda: completion_logprobs(
                model,
                tokenizer,
                [p for p in prompts for _ in range(3)],
                [" A", " dog", " B"] * len(prompts),
            ),
        )
        assert len(plain) == len(prompts) and len(after_cache) == len(prompts)
        monkeypatch.setattr(scoring, "SHARE_MIN_SAVING", 0.0)
        calls.clear()
        shared = completion_logprobs(model, tokenizer, *map(list, zip(*pairs, strict=True)))
        assert len(calls) == 2
    finally:
        hook.remove()
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(got), rtol=1e-4, atol=1e-6)


class NoCacheModel(torch.nn.Module):
    """A causal LM that takes no ``use_cache`` (its config has none) and returns logits
    only, as a non-transformers model might."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        )
        return CausalLMOutput(logits=out.logits)


class CacheDroppingModel(NoCacheModel):
    """Takes ``use_cache`` but returns no cache."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__(inner)
        self.config = SimpleNamespace(max_position_embeddings=64, use_cache=True)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, use_cache=None):
        return super().forward(input_ids, attention_mask, position_ids, logits_to_keep)


@pytest.mark.parametrize("wrapper", [NoCacheModel, CacheDroppingModel])
def test_a_model_without_a_cache_is_scored_one_row_per_pair(tiny, wrapper) -> None:
    _, tokenizer = tiny
    model = tiny_scorer("llama")
    prompts = [p for p in SHARED_PROMPTS for _ in SHARED_COMPLETIONS]
    completions = SHARED_COMPLETIONS * len(SHARED_PROMPTS)
    want = completion_logprobs(model, tokenizer, prompts, completions, batch_size=3)
    got = completion_logprobs(wrapper(model), tokenizer, prompts, completions, batch_size=3)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_scoring_leaves_training_mode_and_gradient_checkpointing_alone(tiny) -> None:
    """A model set up for training with gradient checkpointing (``use_cache`` False in
    its config) is scored with shared prompts and handed back as it was."""
    _, tokenizer = tiny
    model = tiny_scorer("qwen2")
    prompts = [p for p in SHARED_PROMPTS[:3] for _ in SHARED_COMPLETIONS]
    completions = SHARED_COMPLETIONS * 3
    want = completion_logprobs(model, tokenizer, prompts, completions)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.config.use_cache = False  # as molf train sets it with --gradient-checkpointing
    model.train()
    got: list[float] = []
    _, after_cache = fed_rows(
        model, lambda: got.extend(completion_logprobs(model, tokenizer, prompts, completions))
    )
    assert after_cache  # the cache was used
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    assert model.training and (checkpointing or model.is_gradient_checkpointing)
    assert model.config.use_cache is False
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-6)


def test_fact_contests_score_as_before_prompts_were_shared(tiny, monkeypatch) -> None:
    """CounterFact's contests (two answers per prompt): the shared path gives the scores
    of the evaluation's previous path (one right-padded row per answer), and feeds each
    prompt once."""
    model, tokenizer = tiny
    records = get_task("fact").load("builtin", max_eval_samples=8, seed=0).eval
    contests = [(r.prompt, " " + r.target_new, " " + r.target_true) for r in records]
    contests += [(p, " " + t, " " + r.target_new) for r in records for p, t in r.neighbours]
    new = contest_scores(model, tokenizer, contests, batch_size=4)
    old = contest_scores(model, tokenizer, contests, batch_size=4, share_prefix=False)
    for field in ("wanted", "other", "wanted_first", "other_first"):
        torch.testing.assert_close(
            torch.tensor([getattr(s, field) for s in new]),
            torch.tensor([getattr(s, field) for s in old]),
            rtol=1e-4,
            atol=1e-6,
        )
    monkeypatch.setattr(scoring, "SHARE_MIN_SAVING", 0.0)
    plain, _ = fed_rows(model, lambda: contest_scores(model, tokenizer, contests, batch_size=4))
    assert len(plain) == len({p for p, _, _ in contests})
