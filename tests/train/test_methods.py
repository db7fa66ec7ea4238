"""The training methods (molf.train.methods): each strategy's fields and hooks on a tiny
random Llama, the registry against the names settings use, and the import order."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from molf.errors import MolfError
from molf.optim import MoLFAdamW
from molf.train.args import TrainArgs, choices
from molf.train.method_names import METHOD_NAMES, TRAIN_NON_LINEAR_BY_DEFAULT
from molf.train.methods import (
    METHODS,
    AdaLora,
    FullFineTuning,
    MoLF,
    MoLFEfficient,
    PeftAdapter,
    after_optimizer_step,
    build_optimizer,
    check_method_settings,
    load_method_state,
    method_of,
    method_state,
    preflight_warnings,
    wrap,
)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def two_ranks(method: str, **kw) -> TrainArgs:
    return TrainArgs(method=method, lora_ranks=(2, 4), lora_alphas=(4.0, 8.0), **kw)


def test_the_registry_has_one_strategy_per_name_in_the_same_order():
    assert tuple(METHODS) == METHOD_NAMES
    assert choices()["method"] == METHOD_NAMES
    assert all(m.name == name for name, m in METHODS.items())
    assert method_of(TrainArgs(method="dora")) is METHODS["dora"]


# name: (class, routed, peft, trains_base, adapter, adds_to_loss)
FIELDS = {
    "fft": (FullFineTuning, False, False, True, False, False),
    "lora": (PeftAdapter, False, True, False, True, False),
    "dora": (PeftAdapter, False, True, False, True, False),
    "adalora": (AdaLora, False, True, False, True, True),
    "molf": (MoLF, True, False, True, False, False),
    "molf-e": (MoLFEfficient, True, False, False, True, False),
}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_fields(name):
    m = METHODS[name]
    got = (
        type(m),
        m.routed,
        m.peft,
        m.trains_base,
        m.adapter,
        m.adds_to_loss,
    )
    assert got == FIELDS[name]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_train_non_linear_defaults_to_the_methods_choice_and_a_setting_wins(name):
    assert TrainArgs(method=name).effective_train_non_linear is (
        name in TRAIN_NON_LINEAR_BY_DEFAULT
    )
    assert TrainArgs(method=name, train_non_linear=True).effective_train_non_linear is True
    assert TrainArgs(method=name, train_non_linear=False).effective_train_non_linear is False


def test_describe():
    args = two_ranks("molf", top_k=2, score="pfn")
    assert METHODS["fft"].describe(args) == "full fine-tuning (AdamW on every parameter)"
    assert METHODS["lora"].describe(args) == "a LoRA adapter of rank 6 (PEFT)"
    assert METHODS["dora"].describe(args) == "a DoRA adapter of rank 6 (PEFT)"
    assert METHODS["adalora"].describe(args) == "an AdaLoRA adapter of target rank 6 (PEFT)"
    assert "LoRA experts of rank 2+4, each layer's update routed to its top-2 by PFN" in (
        METHODS["molf"].describe(args)
    )
    assert METHODS["molf-e"].describe(args).endswith("one LoRA adapter of rank 6")


def test_lora_lr_is_none_only_without_lora_parameters():
    for name in METHOD_NAMES:
        assert METHODS[name].lora_lr(TrainArgs(method=name, lr=1e-4)) == (
            None if name == "fft" else 1e-4
        )
        got = METHODS[name].lora_lr(TrainArgs(method=name, lr=1e-4, lora_lr=3e-3))
        assert got == (None if name == "fft" else 3e-3)


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


# What each method trains, by parameter name (after wrapping the tiny Llama).
TRAINS = {
    "fft": lambda n: True,
    "lora": _is_lora,
    "dora": lambda n: _is_lora(n) or ".lora_magnitude_vector." in n,
    "adalora": lambda n: any(f".lora_{x}." in n + "." for x in "ABE"),
    "molf": lambda n: True,  # the experts, the dense weights and (by default) the rest
    "molf-e": lambda n: _is_lora(n + "."),
}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_wrap_and_build_optimizer(name):
    args = two_ranks(name, lr=1e-4, lora_lr=3e-3, weight_decay=0.01, lora_weight_decay=0.1)
    model = wrap(tiny_llama(), args, total_steps=50)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if TRAINS[name](n)}
    optimizer = build_optimizer(model, args)
    assert isinstance(optimizer, MoLFAdamW if name.startswith("molf") else torch.optim.AdamW)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(params[n]) for n in trainable}
    if not METHODS[name].routed:  # AdamW: the method's lr; no decay on 1-D parameters
        lr, decay = (1e-4, 0.01) if name == "fft" else (3e-3, 0.1)
        assert {g["lr"] for g in optimizer.param_groups} == {lr}
        for g in optimizer.param_groups:
            assert g["weight_decay"] == (decay if g["params"][0].ndim >= 2 else 0.0)


def test_molf_wraps_the_dense_weights_as_an_expert_and_molf_e_freezes_them():
    for name, frozen in (("molf", False), ("molf-e", True)):
        model = wrap(tiny_llama(), two_ranks(name), total_steps=10)
        q = model.model.layers[0].self_attn.q_proj
        assert q.base_layer.weight.requires_grad is not frozen


def _one_step(model: torch.nn.Module) -> None:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


def test_adalora_state_round_trips_and_after_step_allocates_ranks():
    args = two_ranks("adalora")
    model = wrap(tiny_llama(), args, total_steps=50)
    _one_step(model)
    after_optimizer_step(model, args, 0)  # the rank allocator takes the importance scores
    state = method_state(model, args)
    assert set(state) == {"ipt", "exp_avg_ipt", "exp_avg_unc", "rank_pattern"}
    assert state["ipt"]

    fresh = wrap(tiny_llama(), args, total_steps=50)
    load_method_state(fresh, args, {"other": 1})  # a state without AdaLoRA's keys: no-op
    assert not fresh.base_model.rankallocator.ipt
    load_method_state(fresh, args, {**state, "other": 1})
    allocator = fresh.base_model.rankallocator
    assert allocator.ipt is state["ipt"] and allocator.exp_avg_unc is state["exp_avg_unc"]


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "adalora"])
def test_other_methods_keep_no_state_and_do_nothing_after_a_step(name):
    args = two_ranks(name)
    model = wrap(tiny_llama(), args, total_steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after_optimizer_step(model, args, 0)
    load_method_state(model, args, {"ipt": {}})
    assert method_state(model, args) == {}
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_preflight_warns_only_for_molf_e_with_one_rank():
    one = TrainArgs(method="molf-e", lora_ranks=(16,), lora_alphas=(32.0,))
    assert preflight_warnings(one) == [
        "warning: --method molf-e with one rank (16) is plain rsLoRA: there is nothing to "
        "route; give two ranks, e.g. --lora-ranks 32,128 --lora-alphas 32,32"
    ]
    assert preflight_warnings(two_ranks("molf-e")) == []
    for name in METHOD_NAMES:
        if name != "molf-e":
            assert preflight_warnings(TrainArgs(method=name, lora_ranks=(16,))) == []


def test_bad_settings_fail_before_a_model_loads_in_the_flags_words():
    with pytest.raises(MolfError, match="--top-k"):
        check_method_settings(two_ranks("molf", top_k=4))
    for name in METHOD_NAMES:
        check_method_settings(two_ranks(name))


def test_a_target_module_that_matches_nothing_names_the_method():
    with pytest.raises(MolfError, match="--method lora: "):
        wrap(tiny_llama(), two_ranks("lora", target_modules="nothing_here"), total_steps=10)


def test_args_does_not_import_the_methods():
    code = (
        "import sys; from molf.train.args import TrainArgs; TrainArgs(method='molf-e'); "
        "print('molf.train.methods' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_model_card_names_a_lora_learning_rate_only_for_methods_with_one(tmp_path):
    from molf.train.model_card import model_card

    for name in METHOD_NAMES:
        card = model_card(TrainArgs(method=name, lr=1e-4, lora_lr=3e-3), "base", {}, tmp_path)
        assert ("LoRA learning rate 0.003" in card) is (name != "fft"), name
