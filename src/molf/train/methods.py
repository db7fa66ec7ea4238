"""The fine-tuning methods, built the same way so that comparisons are fair.

fft trains every parameter with AdamW; lora / dora / adalora are real PEFT adapters on
the same target modules with rank ``sum(lora_ranks)`` and alpha ``sum(lora_alphas)``;
molf / molf-e wrap the same targets with MoLF experts and route with MoLFAdamW.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from molf.config import MoLFConfig
from molf.errors import MolfError
from molf.model import get_molf_model
from molf.optim import MoLFAdamW
from molf.train.args import TrainArgs


@dataclass(frozen=True)
class Method:
    """What sets one training method apart; the loop, data and schedule are shared.

    ``routed``: MoLF experts, updated by MoLFAdamW's routing. ``peft``: a PEFT adapter
    wraps the model. ``trains_base``: the dense weights are trained. ``adapter``: the
    final artifact is a PEFT adapter (else a full model, merged for molf).
    ``describe(args)`` is the model card's sentence for it. ``adds_to_loss``: the
    wrapped model adds a term to the loss it computes from labels (AdaLoRA's orthogonal
    regularizer), so the loop must let it compute the loss."""

    name: str
    routed: bool
    peft: bool
    trains_base: bool
    adapter: bool
    describe: Callable[[TrainArgs], str]
    adds_to_loss: bool = False


def _rank(args: TrainArgs) -> int:
    return sum(args.lora_ranks)


def _ranks(args: TrainArgs) -> str:
    return "+".join(map(str, args.lora_ranks))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fft", False, False, True, False,
               lambda a: "full fine-tuning (AdamW on every parameter)"),
        Method("lora", False, True, False, True,
               lambda a: f"a LoRA adapter of rank {_rank(a)} (PEFT)"),
        Method("dora", False, True, False, True,
               lambda a: f"a DoRA adapter of rank {_rank(a)} (PEFT)"),
        Method("adalora", False, True, False, True,
               lambda a: f"an AdaLoRA adapter of target rank {_rank(a)} (PEFT)",
               adds_to_loss=True),
        Method("molf", True, False, True, False,
               lambda a: f"MoLF: the dense weights (FFT expert) and LoRA experts of rank "
               f"{_ranks(a)}, each layer's update routed to its top-{a.top_k} by "
               f"{a.score.upper()} scores; merged into the weights, so this is a plain model"),
        Method("molf-e", True, False, False, True,
               lambda a: f"MoLF-Efficient: frozen weights, LoRA experts of rank {_ranks(a)} "
               f"routed top-{a.top_k} by {a.score.upper()}; exported as one LoRA adapter of "
               f"rank {_rank(a)}"),
    )
}  # fmt: skip


def method_of(args: TrainArgs) -> Method:
    return METHODS[args.method]


def target_modules(args: TrainArgs) -> str | list[str]:
    spec = args.target_modules
    if spec == "all-linear" or any(c in spec for c in "*.[]()|\\^$?+"):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def molf_config(args: TrainArgs) -> MoLFConfig:
    return MoLFConfig(
        target_modules=target_modules(args),
        exclude_modules=("lm_head",),
        lora_ranks=args.lora_ranks,
        lora_alphas=args.lora_alphas,
        use_rslora=args.use_rslora,
        lora_dropout=args.lora_dropout,
        train_base=method_of(args).trains_base,
        train_non_linear=args.effective_train_non_linear,
        top_k=args.top_k,
        score=args.score,
    )


def check_method_settings(args: TrainArgs) -> None:
    """Build the method's config (cheap: no model) so that bad ranks, alphas, top-k or
    target modules fail before a model loads, in the CLI's words (``--top-k``)."""
    try:
        if method_of(args).routed:
            molf_config(args)
        elif method_of(args).peft:
            _peft_config(args, total_steps=100)
    except (MolfError, ValueError, TypeError) as e:
        raise MolfError(_flag_names(str(e))) from None


def _flag_names(message: str) -> str:
    """``message`` with each multi-word setting name (``top_k``) spelled as its flag;
    one-word names (``model``) are ordinary words too and stay as they are."""
    import dataclasses

    names = [f for f in dataclasses.fields(TrainArgs) if "_" in f.name]
    for f in sorted(names, key=lambda f: -len(f.name)):
        message = re.sub(rf"(?<![\w-]){f.name}(?!\w)", "--" + f.name.replace("_", "-"), message)
    return message


def _peft_config(args: TrainArgs, total_steps: int) -> Any:
    from peft import AdaLoraConfig, LoraConfig

    rank, alpha = sum(args.lora_ranks), sum(args.lora_alphas)
    common = dict(
        target_modules=target_modules(args),
        lora_alpha=alpha,
        lora_dropout=args.lora_dropout,
        use_rslora=args.use_rslora,
        task_type="CAUSAL_LM",
        bias="none",
    )
    if args.method == "adalora":
        # Start 50% above the target rank; prune between 10% and 80% of training.
        return AdaLoraConfig(
            init_r=math.ceil(1.5 * rank),
            target_r=rank,
            total_step=total_steps,
            tinit=int(0.1 * total_steps),
            tfinal=int(0.2 * total_steps),
            deltaT=max(1, total_steps // 20),
            **common,
        )
    return LoraConfig(r=rank, use_dora=args.method == "dora", **common)


def _adamw(params: list[tuple[str, nn.Parameter]], lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW with no decay on 1-D parameters (biases, norm weights)."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    return torch.optim.AdamW(groups, lr=lr)


def wrap(model: nn.Module, args: TrainArgs, total_steps: int) -> nn.Module:
    """Add the method's adapters or experts to ``model`` and set what is trainable."""
    method = method_of(args)
    if not (method.routed or method.peft):  # fft
        return model.requires_grad_(True)
    if method.routed:
        try:
            return get_molf_model(model, molf_config(args))
        except MolfError as e:  # e.g. a rank larger than a layer: name the flags
            raise MolfError(_flag_names(str(e))) from None
    from peft import get_peft_model

    try:
        return get_peft_model(model, _peft_config(args, total_steps))
    except ValueError as e:  # e.g. no module matches --target-modules
        raise MolfError(f"--method {args.method}: {_flag_names(str(e))}") from None


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """The method's optimizer over ``model`` (after any FSDP2 sharding)."""
    lora_wd = args.weight_decay if args.lora_weight_decay is None else args.lora_weight_decay
    if args.method == "fft":
        return _adamw(list(model.named_parameters()), args.lr, args.weight_decay)
    if method_of(args).routed:
        return MoLFAdamW(
            model,
            lr=args.lr,
            lora_lr=args.effective_lora_lr,
            weight_decay=args.weight_decay,
            lora_weight_decay=lora_wd,
        )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return _adamw(trainable, args.effective_lora_lr, lora_wd)


def method_state(model: nn.Module, args: TrainArgs) -> dict[str, Any]:
    """What a method keeps outside parameters and optimizer, for exact resume: AdaLoRA's
    importance averages (they decide which ranks get pruned) and its rank pattern."""
    if args.method != "adalora":
        return {}
    adalora = getattr(model, "module", model).base_model
    allocator = adalora.rankallocator
    return {
        "ipt": allocator.ipt,
        "exp_avg_ipt": allocator.exp_avg_ipt,
        "exp_avg_unc": allocator.exp_avg_unc,
        "rank_pattern": adalora.peft_config[adalora.trainable_adapter_name].rank_pattern,
    }


def load_method_state(model: nn.Module, args: TrainArgs, state: dict[str, Any]) -> None:
    """Restore what :func:`method_state` saved (``state`` may hold other keys too)."""
    if args.method != "adalora" or "rank_pattern" not in state:
        return
    adalora = getattr(model, "module", model).base_model
    allocator = adalora.rankallocator
    allocator.ipt, allocator.exp_avg_ipt = state["ipt"], state["exp_avg_ipt"]
    allocator.exp_avg_unc = state["exp_avg_unc"]
    adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = state["rank_pattern"]


def after_optimizer_step(model: nn.Module, args: TrainArgs, step: int) -> None:
    """Method-specific work after each optimizer step (AdaLoRA's rank allocation)."""
    if args.method == "adalora":
        getattr(model, "module", model).base_model.update_and_allocate(step)
