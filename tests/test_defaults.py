"""One set of defaults: MoLFAdamW, MoLFAdamWFactory, MoLFTrainer and ``molf train`` take
weight decay, betas and eps from molf.defaults (TrainingArguments' own defaults, whose
values win where there is one), and build the same run; MoLFConfig(train_base=False)
freezes non-linear parameters as ``molf train --method molf-e`` does; an optimizer
setting that is not used, or an unrouted optimizer, is warned about once."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from helpers import cpu_training_arguments, tiny_model, token_rows
from transformers import Trainer, TrainingArguments

from molf import MoLFAdamW, MoLFConfig, defaults, get_molf_model
from molf.integrations.hf import (
    MoLFAdamWFactory,
    MoLFRoutingCallback,
    MoLFTrainer,
    molf_adamw_kwargs,
)
from molf.train.args import TrainArgs
from molf.train.methods import METHODS, molf_config

CFG = MoLFConfig(lora_ranks=(4,), lora_alphas=(8,))
LORA_LR = 2e-2


def _training_arguments_default(name: str):
    field = next(f for f in dataclasses.fields(TrainingArguments) if f.name == name)
    return field.default


def test_defaults_are_training_arguments_defaults_everywhere():
    hf = (
        _training_arguments_default("weight_decay"),
        (_training_arguments_default("adam_beta1"), _training_arguments_default("adam_beta2")),
        _training_arguments_default("adam_epsilon"),
    )
    assert (defaults.WEIGHT_DECAY, defaults.BETAS, defaults.EPS) == hf
    sig = inspect.signature(MoLFAdamW.__init__).parameters
    assert (sig["weight_decay"].default, sig["betas"].default, sig["eps"].default) == hf
    assert TrainArgs().weight_decay == defaults.WEIGHT_DECAY
    # molf train builds MoLFAdamW with the same weight decay, betas and eps.
    args = TrainArgs(method="molf", lora_ranks=(4,), lora_alphas=(8.0,))
    model = get_molf_model(tiny_model(), molf_config(args))
    opt = METHODS["molf"].build_optimizer(model, args)
    assert (opt.defaults["weight_decay"], opt.defaults["betas"], opt.defaults["eps"]) == hf


def _run(route: str, out, args: TrainingArguments, explicit: bool) -> torch.nn.Module:
    """4 steps of ``route`` on the same model and data; ``explicit``: the optimizer's
    weight decay, betas and eps come from ``args`` (else from the defaults)."""
    model = get_molf_model(tiny_model(), CFG)
    kw = molf_adamw_kwargs(args, lora_lr=LORA_LR) if explicit else {"lr": 1e-2, "lora_lr": LORA_LR}
    if route == "molfadamw":
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=token_rows(),
            optimizers=(MoLFAdamW(model, **kw), None),
        )
    elif route == "factory":
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=token_rows(),
            optimizer_cls_and_kwargs=(MoLFAdamWFactory, kw),
        )
    else:
        trainer = MoLFTrainer(
            model=model, args=args, train_dataset=token_rows(), lora_lr=LORA_LR, routing_logs=False
        )
    trainer.train()
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"weight_decay": 0.1, "adam_beta2": 0.99, "adam_epsilon": 1e-6}],
    ids=["defaults", "set-in-arguments"],
)
def test_the_same_run_three_ways_gives_the_same_weights(overrides, tmp_path):
    args = cpu_training_arguments(tmp_path, **overrides)
    explicit = bool(overrides)  # set in the arguments: MoLFAdamW and the factory take them
    runs = {r: _run(r, tmp_path, args, explicit) for r in ("molfadamw", "factory", "trainer")}
    assert _same_weights(runs["molfadamw"], runs["factory"])
    assert _same_weights(runs["molfadamw"], runs["trainer"])
    if not overrides:  # the old MoLFAdamW default (0.01) is another run: the test can tell
        model = get_molf_model(tiny_model(), CFG)
        opt = MoLFAdamW(model, lr=1e-2, lora_lr=LORA_LR, weight_decay=0.01)
        Trainer(model=model, args=args, train_dataset=token_rows(), optimizers=(opt, None)).train()
        assert not _same_weights(model, runs["trainer"])


def test_molf_adamw_kwargs_maps_training_arguments(tmp_path):
    args = cpu_training_arguments(
        tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6
    )
    assert molf_adamw_kwargs(args, lora_lr=1e-3, lora_weight_decay=None) == {
        "lr": 1e-2,
        "weight_decay": 0.1,
        "betas": (0.8, 0.95),
        "eps": 1e-6,
        "lora_lr": 1e-3,
    }


def _frozen(cfg: MoLFConfig) -> set[str]:
    model = get_molf_model(tiny_model(), cfg)
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_molf_e_freezes_non_linear_parameters_by_default_like_the_cli():
    assert MoLFConfig().train_non_linear is True
    assert MoLFConfig(train_base=False).train_non_linear is False
    assert MoLFConfig(train_base=False, train_non_linear=True).train_non_linear is True
    e = MoLFConfig(lora_ranks=(4,), lora_alphas=(8,), train_base=False)
    assert MoLFConfig.from_dict(e.to_dict()) == e
    frozen = _frozen(e)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert name in frozen
    assert not any("lora_" in n for n in frozen)
    assert not _frozen(dataclasses.replace(e, train_non_linear=True)) & {
        "model.embed_tokens.weight",
        "lm_head.weight",
    }
    # molf train: the same choice per method, and --train-non-linear still wins.
    for method, trains in (("molf", True), ("molf-e", False)):
        assert molf_config(TrainArgs(method=method)).train_non_linear is trains
        assert molf_config(
            TrainArgs(method=method, train_non_linear=not trains)
        ).train_non_linear is (not trains)


def test_molf_trainer_warns_once_that_args_optim_is_not_used(tmp_path, caplog):
    model = get_molf_model(tiny_model(), CFG)
    trainer = MoLFTrainer(
        model=model,
        args=cpu_training_arguments(tmp_path, optim="adafactor"),
        train_dataset=token_rows(),
    )
    with caplog.at_level("WARNING", logger="molf"):
        trainer.create_optimizer()
        trainer.optimizer = None
        trainer.create_optimizer()
    assert caplog.text.count("TrainingArguments(optim='adafactor') is not used") == 1
    assert isinstance(trainer.optimizer, MoLFAdamW)
    caplog.clear()
    with caplog.at_level("WARNING", logger="molf"):
        MoLFTrainer(
            model=model, args=cpu_training_arguments(tmp_path), train_dataset=token_rows()
        ).create_optimizer()
    assert "is not used" not in caplog.text  # the default optim: nothing to say


def test_trainer_with_an_unrouted_optimizer_for_a_molf_model_warns_once(tmp_path, caplog):
    model = get_molf_model(tiny_model(), CFG)
    trainer = Trainer(
        model=model, args=cpu_training_arguments(tmp_path, max_steps=2), train_dataset=token_rows()
    )
    with caplog.at_level("WARNING", logger="molf"):
        MoLFRoutingCallback.attach(trainer)
        trainer.train()
        trainer.train()
    assert caplog.text.count("not MoLFAdamW: every expert is updated") == 1
