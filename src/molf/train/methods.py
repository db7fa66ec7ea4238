"""The fine-tuning methods as strategies, built the same way so that comparisons are fair.

fft trains every parameter with AdamW; lora / dora / adalora are real PEFT adapters on
the same target modules with rank ``sum(lora_ranks)`` and alpha ``sum(lora_alphas)``;
molf / molf-e wrap the same targets with MoLF experts and route with MoLFAdamW.

Each method is one :class:`TrainingMethod`: keyword fields say what sets it apart, and
hooks do the work where methods differ (wrap the model, build the optimizer, the state to
resume, work after each step, warnings before a run). :data:`METHODS` holds one per name
of :data:`~molf.train.method_names.METHOD_NAMES`; the functions at the bottom look up a
run's method and call its hook. To add a method: name it in ``method_names.py``, subclass
:class:`TrainingMethod` (or a subclass) for the hooks that differ, and register it here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from molf.config import MoLFConfig
from molf.errors import MolfError
from molf.model import get_molf_model
from molf.optim import MoLFAdamW
from molf.train.args import TrainArgs


@dataclass(frozen=True, kw_only=True)
class TrainingMethod(ABC):
    """What sets one training method apart; the loop, data and schedule are shared.

    ``routed``: MoLF experts, updated by MoLFAdamW's routing. ``peft``: a PEFT adapter
    wraps the model. ``trains_base``: the dense weights are trained. ``adapter``: the
    final artifact is a PEFT adapter (else a full model, merged for molf).
    ``adds_to_loss``: the wrapped model adds a term to the loss it computes from labels
    (AdaLoRA's orthogonal regularizer), so the loop must let it compute the loss.

    The hooks with a body are the common case: no state beyond parameters and
    optimizer, nothing to do after a step, no warnings, and a LoRA learning rate."""

    name: str
    routed: bool = False
    peft: bool = False
    trains_base: bool = False
    adapter: bool = False
    adds_to_loss: bool = False

    @abstractmethod
    def describe(self, args: TrainArgs) -> str:
        """The model card's phrase for what was trained ("Trained with ...")."""

    def check_settings(self, args: TrainArgs) -> None:
        """Build the method's config without a model; raises on bad settings."""
        return None  # the common case: nothing to do

    @abstractmethod
    def wrap(self, model: nn.Module, args: TrainArgs, total_steps: int) -> nn.Module:
        """``model`` with the method's adapters or experts, and what is trainable set."""

    @abstractmethod
    def build_optimizer(self, model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
        """The method's optimizer over the wrapped ``model`` (after any FSDP2 sharding)."""

    def state(self, model: nn.Module) -> dict[str, Any]:
        """What the method keeps outside parameters and optimizer, for exact resume."""
        return {}

    def load_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` saved (``state`` may hold other keys too)."""
        return None  # the common case: nothing to do

    def after_step(self, model: nn.Module, step: int) -> None:
        """Method-specific work after each optimizer step."""
        return None  # the common case: nothing to do

    def preflight_warnings(self, args: TrainArgs) -> list[str]:
        """Warnings about ``args`` to print before a run starts (each "warning: ...")."""
        return []

    def lora_lr(self, args: TrainArgs) -> float | None:
        """The learning rate of the LoRA parameters, or None for a method without any."""
        return args.effective_lora_lr


@dataclass(frozen=True, kw_only=True)
class FullFineTuning(TrainingMethod):
    """Every parameter trained with AdamW at ``--lr``."""

    def describe(self, args: TrainArgs) -> str:
        return "full fine-tuning (AdamW on every parameter)"

    def wrap(self, model: nn.Module, args: TrainArgs, total_steps: int) -> nn.Module:
        return model.requires_grad_(True)

    def build_optimizer(self, model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
        return _adamw(list(model.named_parameters()), args.lr, args.weight_decay)

    def lora_lr(self, args: TrainArgs) -> float | None:
        return None


@dataclass(frozen=True, kw_only=True)
class PeftAdapter(TrainingMethod):
    """A PEFT LoRA adapter (DoRA's with ``use_dora``) of rank ``sum(lora_ranks)``, its
    trainable parameters updated by AdamW at the LoRA learning rate. ``label`` names the
    adapter in the model card."""

    label: str
    use_dora: bool = False

    def describe(self, args: TrainArgs) -> str:
        return f"a {self.label} adapter of rank {_rank(args)} (PEFT)"

    def peft_config(self, args: TrainArgs, total_steps: int) -> Any:
        """The PEFT config of the adapter for a run of ``total_steps``."""
        from peft import LoraConfig

        return LoraConfig(r=_rank(args), use_dora=self.use_dora, **_peft_common(args))

    def check_settings(self, args: TrainArgs) -> None:
        self.peft_config(args, total_steps=100)

    def wrap(self, model: nn.Module, args: TrainArgs, total_steps: int) -> nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.peft_config(args, total_steps))
        except ValueError as e:  # e.g. no module matches --target-modules
            raise MolfError(f"--method {self.name}: {_flag_names(str(e))}") from None

    def build_optimizer(self, model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return _adamw(trainable, args.effective_lora_lr, _lora_weight_decay(args))


@dataclass(frozen=True, kw_only=True)
class AdaLora(PeftAdapter):
    """PEFT's AdaLoRA: starts 50% above the target rank ``sum(lora_ranks)`` and prunes
    by importance between 10% and 80% of training (its rank allocator runs after each
    step, and its importance averages are state to resume)."""

    label: str = "AdaLoRA"

    def describe(self, args: TrainArgs) -> str:
        return f"an AdaLoRA adapter of target rank {_rank(args)} (PEFT)"

    def peft_config(self, args: TrainArgs, total_steps: int) -> Any:
        from peft import AdaLoraConfig

        rank = _rank(args)
        return AdaLoraConfig(
            init_r=math.ceil(1.5 * rank),
            target_r=rank,
            total_step=total_steps,
            tinit=int(0.1 * total_steps),
            tfinal=int(0.2 * total_steps),
            deltaT=max(1, total_steps // 20),
            **_peft_common(args),
        )

    def state(self, model: nn.Module) -> dict[str, Any]:
        """The importance averages (they decide which ranks get pruned), rank pattern."""
        adalora = _adalora(model)
        allocator = adalora.rankallocator
        return {
            "ipt": allocator.ipt,
            "exp_avg_ipt": allocator.exp_avg_ipt,
            "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": adalora.peft_config[adalora.trainable_adapter_name].rank_pattern,
        }

    def load_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        if "rank_pattern" not in state:
            return
        adalora = _adalora(model)
        allocator = adalora.rankallocator
        allocator.ipt, allocator.exp_avg_ipt = state["ipt"], state["exp_avg_ipt"]
        allocator.exp_avg_unc = state["exp_avg_unc"]
        adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = state["rank_pattern"]

    def after_step(self, model: nn.Module, step: int) -> None:
        _adalora(model).update_and_allocate(step)


@dataclass(frozen=True, kw_only=True)
class MoLF(TrainingMethod):
    """MoLF experts on the target modules (the dense weights the FFT expert when
    ``trains_base``), each layer's update routed by MoLFAdamW."""

    def describe(self, args: TrainArgs) -> str:
        return (
            f"MoLF: the dense weights (FFT expert) and LoRA experts of rank {_ranks(args)}, "
            f"each layer's update routed to its top-{args.top_k} by {args.score.upper()} "
            "scores; merged into the weights, so this is a plain model"
        )

    def check_settings(self, args: TrainArgs) -> None:
        molf_config(args)

    def wrap(self, model: nn.Module, args: TrainArgs, total_steps: int) -> nn.Module:
        try:
            return get_molf_model(model, molf_config(args))
        except MolfError as e:  # e.g. a rank larger than a layer: name the flags
            raise MolfError(_flag_names(str(e))) from None

    def build_optimizer(self, model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
        return MoLFAdamW(
            model,
            lr=args.lr,
            lora_lr=args.effective_lora_lr,
            weight_decay=args.weight_decay,
            lora_weight_decay=_lora_weight_decay(args),
        )


@dataclass(frozen=True, kw_only=True)
class MoLFEfficient(MoLF):
    """MoLF-Efficient: frozen dense weights, LoRA experts only, exported as one adapter."""

    def describe(self, args: TrainArgs) -> str:
        return (
            f"MoLF-Efficient: frozen weights, LoRA experts of rank {_ranks(args)} routed "
            f"top-{args.top_k} by {args.score.upper()}; exported as one LoRA adapter of "
            f"rank {_rank(args)}"
        )

    def preflight_warnings(self, args: TrainArgs) -> list[str]:
        if len(args.lora_ranks) != 1:
            return []
        return [
            f"warning: --method {self.name} with one rank ({args.lora_ranks[0]}) is plain "
            "rsLoRA: there is nothing to route; give two ranks, e.g. --lora-ranks 32,128 "
            "--lora-alphas 32,32"
        ]


METHODS: dict[str, TrainingMethod] = {
    m.name: m
    for m in (
        FullFineTuning(name="fft", trains_base=True),
        PeftAdapter(name="lora", peft=True, adapter=True, label="LoRA"),
        PeftAdapter(name="dora", peft=True, adapter=True, label="DoRA", use_dora=True),
        AdaLora(name="adalora", peft=True, adapter=True, adds_to_loss=True),
        MoLF(name="molf", routed=True, trains_base=True),
        MoLFEfficient(name="molf-e", routed=True, adapter=True),
    )
}


def _rank(args: TrainArgs) -> int:
    return sum(args.lora_ranks)


def _ranks(args: TrainArgs) -> str:
    return "+".join(map(str, args.lora_ranks))


def _lora_weight_decay(args: TrainArgs) -> float:
    return args.weight_decay if args.lora_weight_decay is None else args.lora_weight_decay


def _adalora(model: nn.Module) -> Any:
    """The AdaLoRA model inside ``model`` (unwrapped from DDP)."""
    return getattr(model, "module", model).base_model


def _peft_common(args: TrainArgs) -> dict[str, Any]:
    """The PEFT config settings every adapter method shares."""
    return dict(
        target_modules=target_modules(args),
        lora_alpha=sum(args.lora_alphas),
        lora_dropout=args.lora_dropout,
        use_rslora=args.use_rslora,
        task_type="CAUSAL_LM",
        bias="none",
    )


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


def _flag_names(message: str) -> str:
    """``message`` with each multi-word setting name (``top_k``) spelled as its flag;
    one-word names (``model``) are ordinary words too and stay as they are."""
    names = [f for f in dataclasses.fields(TrainArgs) if "_" in f.name]
    for f in sorted(names, key=lambda f: -len(f.name)):
        message = re.sub(rf"(?<![\w-]){f.name}(?!\w)", "--" + f.name.replace("_", "-"), message)
    return message


def method_of(args: TrainArgs) -> TrainingMethod:
    """The strategy of ``args.method``."""
    return METHODS[args.method]


def target_modules(args: TrainArgs) -> str | list[str]:
    """``--target-modules`` as PEFT and MoLF take it: a pattern, or a list of suffixes."""
    spec = args.target_modules
    if spec == "all-linear" or any(c in spec for c in "*.[]()|\\^$?+"):
        return spec
    return [s.strip() for s in spec.split(",") if s.strip()]


def molf_config(args: TrainArgs) -> MoLFConfig:
    """The MoLF config of a molf or molf-e run."""
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
        method_of(args).check_settings(args)
    except (MolfError, ValueError, TypeError) as e:
        raise MolfError(_flag_names(str(e))) from None


def preflight_warnings(args: TrainArgs) -> list[str]:
    """The method's warnings about ``args`` before a run (e.g. molf-e with one rank)."""
    return method_of(args).preflight_warnings(args)


def wrap(model: nn.Module, args: TrainArgs, total_steps: int) -> nn.Module:
    """Add the method's adapters or experts to ``model`` and set what is trainable."""
    return method_of(args).wrap(model, args, total_steps)


def build_optimizer(model: nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """The method's optimizer over ``model`` (after any FSDP2 sharding)."""
    return method_of(args).build_optimizer(model, args)


def method_state(model: nn.Module, args: TrainArgs) -> dict[str, Any]:
    """What a method keeps outside parameters and optimizer, for exact resume: AdaLoRA's
    importance averages (they decide which ranks get pruned) and its rank pattern."""
    return method_of(args).state(model)


def load_method_state(model: nn.Module, args: TrainArgs, state: dict[str, Any]) -> None:
    """Restore what :func:`method_state` saved (``state`` may hold other keys too)."""
    method_of(args).load_state(model, state)


def after_optimizer_step(model: nn.Module, args: TrainArgs, step: int) -> None:
    """Method-specific work after each optimizer step (AdaLoRA's rank allocation)."""
    method_of(args).after_step(model, step)
