"""Wrapping, merging, PEFT export and bad input, on tiny Qwen2 / Llama / Gemma3 models."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from molf import (
    MoLFAdamW,
    MoLFConfig,
    MolfError,
    MoLFLinear,
    export_peft_adapter,
    get_molf_model,
    merge_and_unload,
    molf_modules,
)
from molf.model import find_target_modules

TOKENS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


def _train(model, steps=6, **opt_kw):
    model.train()
    opt = MoLFAdamW(model, **{"lr": 1e-2, "lora_lr": 2e-2, **opt_kw})
    for step in range(steps):
        x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(step))
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_merge_gives_the_same_logits_and_reloads(arch, tmp_path):
    model = get_molf_model(
        tiny_model(arch), MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 16), top_k=2)
    )
    opt = _train(model)
    assert opt.last_routing.selected[:, 1:].any(), "LoRA experts never trained: merge untested"
    with torch.no_grad():
        before = model(TOKENS).logits
        merged = merge_and_unload(model)
        after = merged(TOKENS).logits
    assert not any(isinstance(m, MoLFLinear) for m in merged.modules())
    assert not hasattr(merged, "molf_config")
    assert (after - before).abs().max() <= 1e-5
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (reloaded(TOKENS).logits - before).abs().max() <= 1e-5


def test_merge_in_bfloat16_happens_in_fp32():
    model = get_molf_model(
        tiny_model().to(torch.bfloat16), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,))
    )
    _train(model, steps=3)
    layer = next(layer for _, layer in molf_modules(model))
    w, a, b = (
        t.detach().float() for t in (layer.base_layer.weight, layer.lora_A[0], layer.lora_B[0])
    )
    expected = (w + layer.scalings[0] * b @ a).to(torch.bfloat16)
    merge_and_unload(model)
    assert torch.equal(layer.base_layer.weight, expected)


@pytest.mark.parametrize("train_non_linear", [False, True])
def test_peft_export_reproduces_molf_e(train_non_linear, tmp_path):
    cfg = MoLFConfig(
        lora_ranks=(2, 6),
        lora_alphas=(8, 8),
        train_base=False,
        train_non_linear=train_non_linear,
        exclude_modules=None,
        target_modules=["q_proj", "v_proj", "down_proj"],
    )
    model = get_molf_model(tiny_model("qwen2", tie_word_embeddings=False), cfg)
    _train(model)
    with torch.no_grad():
        expected = model(TOKENS).logits
    export_peft_adapter(model, tmp_path / "adapter")
    base = tiny_model("qwen2", tie_word_embeddings=False)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].r == 8
    with torch.no_grad():
        got = peft_model(TOKENS).logits
    assert (got - expected).abs().max() <= 1e-5
    assert not any(p.name.startswith(".adapter-") for p in tmp_path.iterdir())


def test_target_matching_follows_peft_rules():
    model = tiny_model()
    every = find_target_modules(
        model, MoLFConfig(exclude_modules=None, lora_ranks=(4,), lora_alphas=(4,))
    )
    assert len(every) == 2 * 7 and "lm_head" not in every  # all-linear skips the output layer
    qv = find_target_modules(
        model, MoLFConfig(target_modules=["q_proj", "v_proj"], lora_ranks=(4,), lora_alphas=(4,))
    )
    assert qv == [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"]
    rx = find_target_modules(
        model, MoLFConfig(target_modules=r".*\.1\.mlp\..*", lora_ranks=(4,), lora_alphas=(4,))
    )
    assert rx == [f"model.layers.1.mlp.{m}_proj" for m in ("gate", "up", "down")]
    ex = find_target_modules(
        model,
        MoLFConfig(exclude_modules=["mlp.down_proj", "lm_head"], lora_ranks=(4,), lora_alphas=(4,)),
    )
    assert len(ex) == 12 and not any(n.endswith("down_proj") for n in ex)


def test_wrap_sets_trainable_parameters():
    model = get_molf_model(
        tiny_model(),
        MoLFConfig(lora_ranks=(4,), lora_alphas=(4,), train_base=False, train_non_linear=False),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert model.molf_config.train_base is False
    full = get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(4,)))
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lora_ranks=(4, 8), lora_alphas=(4,)), "one alpha per LoRA expert"),
        (dict(lora_ranks=(), lora_alphas=()), "lora_ranks is empty"),
        (dict(lora_ranks=(0,), lora_alphas=(4,)), "positive integers"),
        (dict(lora_ranks=(4,), lora_alphas=(4,), top_k=0), "top_k must be between 1 and"),
        (dict(lora_ranks=(4,), lora_alphas=(4,), top_k=3), "top_k must be between 1 and"),
        (dict(lora_ranks=(4,), lora_alphas=(4,), train_base=False, top_k=2), r"\(1: lora0\)"),
        (dict(lora_ranks=(4,), lora_alphas=(4,), score="l2"), "score must be one of"),
        (
            dict(lora_ranks=(4,), lora_alphas=(4,), lora_dropout=0.1, lora_grad_path="fused"),
            "lora_dropout=0",
        ),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(MolfError, match=match):
        MoLFConfig(**kwargs)


def test_bad_wrap_is_a_clear_error(tmp_path):
    with pytest.raises(MolfError, match="matches no nn.Linear layer.*q_proj"):
        get_molf_model(
            tiny_model(), MoLFConfig(target_modules=["attn_q"], lora_ranks=(4,), lora_alphas=(4,))
        )
    with pytest.raises(MolfError, match=r"lora_ranks \[64\] exceed min\(d_in, d_out\) = 32"):
        get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(64,), lora_alphas=(4,)))
    model = get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(4,)))
    with pytest.raises(MolfError, match="already holds MoLF layers"):
        get_molf_model(model, MoLFConfig(lora_ranks=(4,), lora_alphas=(4,)))
    with pytest.raises(MolfError, match="MoLF-Efficient"):
        export_peft_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(MolfError, match="get_molf_model"):
        export_peft_adapter(nn.Linear(2, 2), tmp_path / "b")


def test_parameter_summary_counts_each_expert_and_the_merged_size():
    import copy

    from molf.model import parameter_summary

    model = get_molf_model(tiny_model("llama"), MoLFConfig(lora_ranks=(2, 4), lora_alphas=(8, 8)))
    text = parameter_summary(model)
    layers = [layer for _, layer in molf_modules(model)]
    total = sum(p.numel() for p in model.parameters())
    dense = sum(x.base_layer.weight.numel() for x in layers) + sum(
        x.base_layer.bias.numel() for x in layers if x.base_layer.bias is not None
    )
    assert text.startswith(f"trainable params: {total:,} || all params: {total:,}")
    assert f"fft expert (W, b of {len(layers)} layers) {dense:,}" in text
    for i, rank in enumerate((2, 4)):
        lora = sum(x.lora_A[i].numel() + x.lora_B[i].numel() for x in layers)
        assert f"lora{i} (rank {rank}) {lora:,}" in text
    merged = merge_and_unload(copy.deepcopy(model))
    assert f"merged model: {sum(p.numel() for p in merged.parameters()):,} params" in text
