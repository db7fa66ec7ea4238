"""Helpers the tests share (import them: ``from helpers import tiny_model``): tiny real
Hugging Face models and where the shared data lives."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of a real HF architecture."""
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()  # q/k/v carry biases
    if arch == "gemma3":
        kw.setdefault("head_dim", 8)
        kw.setdefault("sliding_window", 16)
        return Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval()
    raise ValueError(arch)


def data_dir() -> Path | None:
    d = os.environ.get("MOLF_DATA_DIR")
    return Path(d) if d else None
