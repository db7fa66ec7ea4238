"""MoLFAdamW where Trainer builds an optimizer: :class:`MoLFAdamWFactory` for
``optimizer_cls_and_kwargs``, and :func:`build_molf_adamw`, which both it and
:class:`~molf.integrations.hf.MoLFTrainerMixin` use. The optimizer is built from the MoLF
model found inside what Trainer passes (MoLFAdamW routes per module, so parameter groups
are not enough), with its keyword arguments checked, and is guarded at its first step
against parameters replaced or moved after it was built (accelerate's FSDP2 prepare)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from molf.errors import MolfError
from molf.integrations.hf.discovery import find_molf_model
from molf.optim import MoLFAdamW

# The keyword arguments MoLFAdamW takes besides the model.
_OPTIMIZER_KWARGS = tuple(inspect.signature(MoLFAdamW.__init__).parameters)[2:]


def molf_adamw_kwargs(args: Any, **overrides: Any) -> dict[str, Any]:
    """MoLFAdamW's keyword arguments from ``TrainingArguments`` ``args``: ``lr`` =
    ``learning_rate``, ``weight_decay``, ``betas`` = ``(adam_beta1, adam_beta2)``, ``eps``
    = ``adam_epsilon``, then ``overrides`` that are not ``None`` (e.g. ``lora_lr``). What
    :class:`~molf.integrations.hf.MoLFTrainer` builds its optimizer with, and what to give
    :class:`MoLFAdamWFactory` (which Trainer does not hand the arguments) so that it
    follows them too: ``optimizer_cls_and_kwargs=(MoLFAdamWFactory,
    molf_adamw_kwargs(args, lora_lr=1e-3))``."""
    kwargs = {
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
    }
    return {**kwargs, **{k: v for k, v in overrides.items() if v is not None}}


def guard_parameters(opt: MoLFAdamW) -> None:
    """Check at the first step that the optimizer still holds the parameter objects it
    was built from, on the device it was built on. MoLFAdamW maps each parameter to its
    module and expert when it is built; accelerate's FSDP2 ``prepare`` (which Trainer
    calls after creating the optimizer) replaces the parameters by sharded ones, and a
    model moved to another device after the optimizer was built leaves it on the old
    one. Either would train without routing or fail obscurely: fail clearly instead."""
    params = [p for g in opt.param_groups for p in g["params"]]
    built = [id(p) for p in params]
    device = params[0].device if params else None

    def check(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        now = [p for g in optimizer.param_groups for p in g["params"]]
        replaced = [id(p) for p in now[: len(built)]] != built
        moved = next((p.device for p in now if p.device != device), None)
        if replaced or moved is not None:
            what = "replaced" if replaced else f"moved from {device} to {moved}"
            raise MolfError(
                f"MoLFAdamW's parameters were {what} after it was built (accelerate's FSDP2 "
                "prepare does this, and so does moving the model to another device): "
                "MoLFAdamW must be built from the model as it is trained. Not supported yet "
                "under Trainer + FSDP2; use `molf train --parallel fsdp2`, or build the "
                "optimizer after wrapping and placing the model"
            )
        handle.remove()

    handle = opt.register_step_pre_hook(check)


def build_molf_adamw(target: Any, kwargs: dict[str, Any]) -> MoLFAdamW:
    """MoLFAdamW with ``kwargs`` for the MoLF model in ``target`` (or, when ``target`` is
    parameter groups, in ``kwargs["model"]``), guarded by :func:`guard_parameters`.
    Raises :class:`~molf.MolfError` when there is no MoLF model, a keyword is not
    MoLFAdamW's, or ``lr`` is missing."""
    kwargs = dict(kwargs)
    explicit = kwargs.pop("model", None)
    model = find_molf_model(target)
    if model is None and explicit is not None:
        model = find_molf_model(explicit)
    if model is None:
        if isinstance(target, nn.Module) or explicit is not None:
            raise MolfError(
                "MoLFAdamWFactory: the model holds no MoLF layers: wrap it with "
                "get_molf_model(model, MoLFConfig(...)) before giving it to the Trainer "
                "(with model_init, inside model_init)"
            )
        raise MolfError(
            "MoLFAdamWFactory was given parameter groups, not the model: this version of "
            "transformers calls optimizer_cls with parameter groups (newer ones call "
            'optimizer factories with the model). Add "model": model to the kwargs '
            "(Trainer then passes it in place of the groups; it is the model given at "
            "construction, so not with model_init), or use MoLFTrainer"
        )
    unknown = sorted(set(kwargs) - set(_OPTIMIZER_KWARGS))
    if unknown:
        raise MolfError(
            f"MoLFAdamWFactory: unknown keyword(s) {unknown}; MoLFAdamW takes "
            f"{list(_OPTIMIZER_KWARGS)}"
        )
    if "lr" not in kwargs:
        raise MolfError(
            "MoLFAdamWFactory needs lr in its kwargs (Trainer does not pass "
            "args.learning_rate to optimizer_cls_and_kwargs), e.g. "
            '(MoLFAdamWFactory, {"lr": 1e-4, "lora_lr": 1e-3})'
        )
    opt = MoLFAdamW(model, **kwargs)
    guard_parameters(opt)
    return opt


class MoLFAdamWFactory:
    """Builds :class:`~molf.MoLFAdamW` (which routes per module, so it needs the model,
    not parameter groups) wherever Trainer builds an optimizer from
    ``optimizer_cls_and_kwargs``::

        Trainer(..., optimizer_cls_and_kwargs=(MoLFAdamWFactory, {"lr": 1e-4, "lora_lr": 1e-3}))

    The kwargs are MoLFAdamW's (``lr`` is required: Trainer does not pass
    ``args.learning_rate`` this way, nor ``weight_decay``, ``adam_beta*`` or
    ``adam_epsilon``, which otherwise take the defaults of :mod:`molf.defaults`, the same
    as ``TrainingArguments``'): :func:`molf_adamw_kwargs` makes them from the
    ``TrainingArguments``. Trainer's own parameter groups are not used: MoLFAdamW makes
    its groups (see its docstring).

    transformers 5 (since it has optimizer factories) treats a class that is not a torch
    optimizer as a factory and calls ``MoLFAdamWFactory()(model, **kwargs)`` with the
    model it is training, so this works with ``model_init`` and hyperparameter search
    (each trial's model) too. Older versions call ``MoLFAdamWFactory(groups, **kwargs)``
    with parameter groups, which cannot be mapped back to MoLF layers: add ``"model":
    model`` to the kwargs (Trainer passes it in place of the groups; versions with
    factories ignore it for the model they pass) or use :class:`MoLFTrainer`.
    """

    def __new__(cls, params: Any = None, /, **kwargs: Any) -> Any:
        if params is None and "model" not in kwargs:
            if kwargs:
                raise MolfError("MoLFAdamWFactory: give the model (or call it with one)")
            return super().__new__(cls)  # the factory protocol: cls()(model, **kwargs)
        return build_molf_adamw(params, kwargs)  # cls(params_or_model, **kwargs)

    def __call__(self, model: nn.Module, /, **kwargs: Any) -> MoLFAdamW:
        # A "model" kwarg (kept for older transformers) yields to the model Trainer passes.
        return build_molf_adamw(model, kwargs)
