"""Scoring and generation with the real stories260k model."""

from __future__ import annotations

import copy

import torch

from molf.tasks.encoding import CHAT_ATTR, ChatFormat, encode_example, use_chat_template
from molf.tasks.scoring import completion_logprobs, generate, inference, stop_ids

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
