"""MoLF in the Hugging Face stack: ``transformers.Trainer`` (and trainers built on it,
such as TRL's ``SFTTrainer``) and ``accelerate``.

- :class:`MoLFAdamWFactory` builds :class:`~molf.MoLFAdamW` through
  ``Trainer(optimizer_cls_and_kwargs=(MoLFAdamWFactory, {"lr": ..., "lora_lr": ...}))``,
  the route Trainer allows with ``model_init`` / hyperparameter search (and with FSDP,
  which MoLFAdamW does not support under Trainer yet: it refuses at its first step).
- :class:`MoLFTrainerMixin` (and :class:`MoLFTrainer` = the mixin on ``Trainer``) builds
  MoLFAdamW from the ``TrainingArguments``, logs routing shares, and saves safely:
  ``save_model()`` writes the merged (plain) model; checkpoints hold both the MoLF
  tensors (exact resume) and the merged weights (a plain ``from_pretrained`` loads the
  trained model, never a re-initialised one).
- :class:`MoLFRoutingCallback` puts the routing shares into Trainer's logs.
- :func:`routing_of` / :func:`find_molf_optimizer` reach the optimizer through wrappers
  (accelerate's ``AcceleratedOptimizer``, a Trainer, ...).
- :func:`merged_state_dict`: the state dict of the merged model, without merging the model.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import DefaultFlowCallback, Trainer, TrainerCallback

from molf.errors import MolfError
from molf.layer import MoLFLinear
from molf.model import molf_modules
from molf.optim import MoLFAdamW, Routing
from molf.routing_stats import (
    CollapseWatch,
    LoraExpert,
    RoutingCounts,
    RoutingSetup,
    collapse_warning,
)

logger = logging.getLogger("molf")

__all__ = [
    "MoLFAdamWFactory",
    "MoLFRoutingCallback",
    "MoLFTrainer",
    "MoLFTrainerMixin",
    "find_molf_optimizer",
    "merged_state_dict",
    "routing_of",
]

# The keyword arguments MoLFAdamW takes besides the model.
_OPTIMIZER_KWARGS = tuple(inspect.signature(MoLFAdamW.__init__).parameters)[2:]


# --------------------------------------------------------------------------- finding things


def _molf_model(obj: Any) -> nn.Module | None:
    """The MoLF model (the module holding ``molf_config``) inside ``obj``, looking through
    wrappers that keep the model as ``.module`` (DDP, DeepSpeed, FSDP1) or ``._orig_mod``
    (``torch.compile``); ``None`` when there is none."""
    seen: set[int] = set()
    while isinstance(obj, nn.Module) and id(obj) not in seen:
        if getattr(obj, "molf_config", None) is not None:
            return obj
        seen.add(id(obj))
        obj = getattr(obj, "module", None) or getattr(obj, "_orig_mod", None)
    return None


def find_molf_optimizer(obj: Any) -> MoLFAdamW | None:
    """The :class:`~molf.MoLFAdamW` in ``obj`` (itself, or reached through ``.optimizer``:
    accelerate's ``AcceleratedOptimizer``, a ``Trainer``, DeepSpeed's wrappers, ...);
    ``None`` when there is none."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        if isinstance(obj, MoLFAdamW):
            return obj
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)
    return None


def routing_of(obj: Any) -> Routing | None:
    """``last_routing`` of the :class:`~molf.MoLFAdamW` in ``obj`` (see
    :func:`find_molf_optimizer`): the last step's routing, ``None`` before the first step.
    Raises :class:`~molf.MolfError` when ``obj`` holds no MoLFAdamW."""
    opt = find_molf_optimizer(obj)
    if opt is None:
        raise MolfError(
            f"routing_of: no MoLFAdamW in {type(obj).__name__} (looked at it and through "
            "its .optimizer attributes)"
        )
    return opt.last_routing


# --------------------------------------------------------------------------- the optimizer


def _guard_parameters(opt: MoLFAdamW) -> None:
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


def _build_molf_adamw(target: Any, kwargs: dict[str, Any]) -> MoLFAdamW:
    kwargs = dict(kwargs)
    explicit = kwargs.pop("model", None)
    model = _molf_model(target)
    if model is None and explicit is not None:
        model = _molf_model(explicit)
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
    _guard_parameters(opt)
    return opt


class MoLFAdamWFactory:
    """Builds :class:`~molf.MoLFAdamW` (which routes per module, so it needs the model,
    not parameter groups) wherever Trainer builds an optimizer from
    ``optimizer_cls_and_kwargs``::

        Trainer(..., optimizer_cls_and_kwargs=(MoLFAdamWFactory, {"lr": 1e-4, "lora_lr": 1e-3}))

    The kwargs are MoLFAdamW's (``lr`` is required: Trainer does not pass
    ``args.learning_rate`` this way). Trainer's own parameter groups and weight decay are
    not used: MoLFAdamW makes its groups (see its docstring).

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
        return _build_molf_adamw(params, kwargs)  # cls(params_or_model, **kwargs)

    def __call__(self, model: nn.Module, /, **kwargs: Any) -> MoLFAdamW:
        # A "model" kwarg (kept for older transformers) yields to the model Trainer passes.
        return _build_molf_adamw(model, kwargs)


# --------------------------------------------------------------------------- state dicts


def merged_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    keep_experts: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict of the merged model (what ``merge_and_unload`` would give, to the
    bit), computed without changing ``model``.

    ``state_dict`` (default ``model.state_dict()``) is a full state dict of the MoLF
    model, e.g. one gathered from FSDP; each MoLF layer's tensors (its
    :meth:`~molf.layer.MoLFLinear.state_keys`) become ``weight`` (its
    :meth:`~molf.layer.MoLFLinear.merged_weight`) and ``bias``, in place in the key
    order; every other entry is kept as it is. The merged tensors are on the CPU (a copy
    of the targeted weights would otherwise be held on the accelerator while saving).
    With ``keep_experts``, the MoLF tensors stay too, so the dict both loads into the
    MoLF model (which ignores ``weight`` and ``bias`` as unexpected keys) and, by name,
    into the plain model. A layer none of whose tensors are in ``state_dict`` is left
    alone.
    """
    molf_model = _molf_model(model)
    if molf_model is None:
        raise MolfError("merged_state_dict needs a model wrapped by get_molf_model")
    sd = molf_model.state_dict() if state_dict is None else state_dict
    order = {k: i for i, k in enumerate(sd)}
    replace: dict[str, dict[str, torch.Tensor]] = {}  # first key of a layer -> new entries
    drop: set[str] = set()
    for name, layer in molf_modules(molf_model):
        prefix = f"{name}." if name else ""
        needed = layer.state_keys(prefix).all()
        present = [k for k in needed if k in sd]
        if not present:
            continue
        if len(present) < len(needed):
            missing = sorted(set(needed) - set(present))
            raise MolfError(f"merged_state_dict: the state dict lacks {missing}")
        replace[min(present, key=order.__getitem__)] = _merged_layer(
            layer, sd, prefix, keep_experts
        )
        if not keep_experts:
            drop.update(needed)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in replace:
            out.update(replace[key])
        if key not in drop:
            out[key] = value
    return out


def _merged_layer(
    layer: MoLFLinear, sd: dict[str, torch.Tensor], prefix: str, keep_experts: bool
) -> dict[str, torch.Tensor]:
    """The merged ``nn.Linear``'s entries for ``layer``, whose tensors ``sd`` holds under
    ``prefix``: ``weight`` (:meth:`~molf.layer.MoLFLinear.merged_weight`) and ``bias``,
    on the CPU; the bias is a copy when the experts (and so its MoLF entry) stay."""
    new = {prefix + "weight": layer.merged_weight(sd, prefix).to("cpu")}
    bias_key = layer.state_keys(prefix).bias
    if bias_key is not None:
        bias = sd[bias_key].detach()
        new[prefix + "bias"] = bias.to("cpu", copy=True) if keep_experts else bias
    return new


# --------------------------------------------------------------------------- routing logs


class MoLFRoutingCallback(TrainerCallback):
    """Adds MoLF's routing shares to Trainer's training logs, at each logging step:
    ``routing/<expert>`` (the share of layer-steps in which the expert was selected,
    over the steps since the last log) and ``routing/<type>/<expert>`` (the same per
    module type: ``q_proj``, ``down_proj``, ...). The keys are the ones ``molf train``
    sends to its trackers. Over the experts, the shares sum to ``top_k`` (less when steps
    were skipped for a non-finite gradient).

    Counting happens on the device at each optimizer step, with no synchronisation; the
    counts are read once per log.

    Trainer calls its reporting callbacks (``report_to``: TensorBoard, W&B, ...) before
    callbacks given to it, so add this one with :meth:`attach`, which puts it before
    them: the shares then reach the trackers and ``trainer.state.log_history`` in the
    same record as the loss. :class:`MoLFTrainer` attaches one itself.
    """

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # long [modules, experts], on the device
        self._decisions: torch.Tensor | None = None  # long [modules], on the device
        self._step_wins: list[tuple[int, torch.Tensor]] = []  # step, long [experts + 1]
        self._modules: list[str] = []
        self._experts: list[str] = []
        self._steps = 0
        self._seen: Routing | None = None
        self._attached = False
        self._warned = False
        self._watch: CollapseWatch | None = None
        self._setup: RoutingSetup | None = None
        self._warmup, self._top_k = 0, 1

    @classmethod
    def attach(cls, trainer: Trainer) -> MoLFRoutingCallback:
        """Put a routing callback (the trainer's own if it has one) before the trainer's
        reporting callbacks, right after ``DefaultFlowCallback``; returns it."""
        callbacks = trainer.callback_handler.callbacks
        cb = next((c for c in callbacks if isinstance(c, cls)), None)
        if cb is None:
            cb = cls()
        else:
            callbacks.remove(cb)
        flow = [i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, cb)
        cb._attached = True
        if not isinstance(trainer, MoLFTrainerMixin):
            logger.warning(
                "%s is not a MoLF trainer: its save_model() and checkpoints hold the MoLF "
                "state dict (q_proj.base_layer.weight, q_proj.lora_A.0, ...), which a plain "
                "from_pretrained loads with those layers re-initialised. Use MoLFTrainer, or "
                "class MyTrainer(MoLFTrainerMixin, %s), or save with "
                "model.save_pretrained(path, state_dict=merged_state_dict(model))",
                type(trainer).__name__,
                type(trainer).__name__,
            )
        return cb

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._counts, self._decisions, self._steps, self._seen = None, None, 0, None
        self._step_wins, self._watch = [], None
        opt, molf = find_molf_optimizer(optimizer), _molf_model(model)
        if opt is None or molf is None:
            return
        config = molf.molf_config
        lrs = {g.get("name", ""): g.get("initial_lr", g["lr"]) for g in opt.param_groups}
        lr = next((v for k, v in lrs.items() if not str(k).startswith("lora")), 0.0)
        lora_lr = next((v for k, v in lrs.items() if str(k).startswith("lora")), lr)
        lora = [
            LoraExpert(int(r), float(a), config.use_rslora)
            for r, a in zip(config.lora_ranks, config.lora_alphas)
        ]
        self._setup = RoutingSetup(
            lr, lora_lr, lora, has_fft=config.train_base, library=True, score=config.score
        )
        warmup = args.get_warmup_steps(state.max_steps) if state.max_steps else 0
        self._warmup, self._top_k = warmup, config.top_k

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = find_molf_optimizer(optimizer)
        routing = None if opt is None else opt.last_routing
        if routing is None or routing is self._seen:  # no MoLF step since the last count
            return
        self._seen = routing
        made = (routing.scores != 0).any(-1)  # all scores 0: no decision (lr 0, no gradient)
        selected = (routing.selected & made[:, None]).long()
        if self._counts is None or self._counts.shape != selected.shape:
            self._counts, self._steps = torch.zeros_like(selected), 0
            self._decisions = torch.zeros_like(made, dtype=torch.long)
            self._modules, self._experts = list(routing.modules), list(routing.experts)
        self._counts += selected
        self._decisions += made
        self._step_wins.append((state.global_step, torch.cat([selected.sum(0), made.sum()[None]])))
        self._steps += 1

    def counts(self) -> RoutingCounts | None:
        """The counts since the last log, on the host (None when no MoLF step was counted)."""
        if self._counts is None or not self._steps:
            return None
        counts = RoutingCounts(self._modules, self._experts)
        counts.counts = self._counts.cpu().numpy()
        counts.decisions = self._decisions.cpu().numpy()
        counts.steps = self._steps
        counts.ties = self._steps * len(self._modules) - int(counts.decisions.sum())
        return counts

    def shares(self) -> dict[str, float]:
        """The shares since the last log (empty when no MoLF step was counted)."""
        counts = self.counts()
        return {} if counts is None else counts.scalars()

    def _watch_collapse(self, state) -> None:
        """Feed the steps since the last log to the collapse watch; warn once (rank 0)."""
        steps, self._step_wins = self._step_wins, []
        if self._setup is None or not steps:
            return
        if self._watch is None:
            self._watch = CollapseWatch(self._experts, self._top_k, self._warmup)
        wins = torch.stack([w for _, w in steps]).cpu().numpy()
        for (step, _), row in zip(steps, wins):
            collapse = self._watch.add(step, row[:-1], int(row[-1]))
            if collapse is not None and state.is_world_process_zero:
                logger.warning("%s", collapse_warning(collapse, self._setup))

    def on_train_end(self, args, state, control, **kwargs):
        self._watch_collapse(state)
        collapse = None if self._watch is None else self._watch.current()
        if collapse is not None and self._setup is not None and state.is_world_process_zero:
            logger.warning("at the end of training: %s", collapse_warning(collapse, self._setup))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training logs only ("loss" every logging step, "train_loss" in the summary at
        # the end, which takes the steps after the last logging step); not evaluation's.
        if logs is None or not ("loss" in logs or "train_loss" in logs):
            return
        shares = self.shares()
        if not shares:
            return
        self._watch_collapse(state)
        self._counts.zero_()
        self._decisions.zero_()
        self._steps = 0
        logs.update(shares)
        # Trainer appended {**logs, "step": ...} to log_history just before this event.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step:
            last.update(shares)
        report_to = [args.report_to] if isinstance(args.report_to, str) else args.report_to
        trackers = [r for r in (report_to or []) if r != "none"]
        if trackers and not self._attached and not self._warned:
            self._warned = True
            logger.warning(
                "MoLFRoutingCallback was added after Trainer's reporting callbacks %s: the "
                "routing shares are in trainer.state.log_history but do not reach the "
                "trackers; add it with MoLFRoutingCallback.attach(trainer) instead",
                trackers,
            )


# --------------------------------------------------------------------------- Trainer


class MoLFTrainerMixin:
    """MoLF for ``transformers.Trainer`` or any trainer built on it: put it first among
    the bases, e.g. ``class MoLFSFTTrainer(MoLFTrainerMixin, SFTTrainer): pass``.

    - **Optimizer**: unless ``optimizers`` or ``optimizer_cls_and_kwargs`` is given,
      :class:`~molf.MoLFAdamW` with ``lr=args.learning_rate``,
      ``weight_decay=args.weight_decay``, ``betas=(args.adam_beta1, args.adam_beta2)``,
      ``eps=args.adam_epsilon``, and this constructor's ``lora_lr`` and
      ``lora_weight_decay`` (default: the same as the dense ones). ``args.optim`` is
      not used. Trainer's scheduler scales every group alike.
    - **Routing logs**: a :class:`MoLFRoutingCallback` is attached (``routing_logs=False``
      to leave it out).
    - **Saving**: ``save_model()`` (and ``push_to_hub()``) writes the merged model,
      computed into a state dict (the model being trained is not changed), which
      ``AutoModelForCausalLM.from_pretrained`` loads like any plain model. Checkpoints
      (``save_steps``) hold the MoLF tensors, which ``train(resume_from_checkpoint=...)``
      restores exactly, and the merged weights under the plain names, so loading a
      checkpoint as a plain model gives the model trained so far; they also hold
      ``molf_config.json`` (wrap a fresh model with that config to resume).
    """

    def __init__(
        self,
        *args: Any,
        lora_lr: float | None = None,
        lora_weight_decay: float | None = None,
        routing_logs: bool = True,
        **kwargs: Any,
    ) -> None:
        self.molf_lora_lr = lora_lr
        self.molf_lora_weight_decay = lora_weight_decay
        self._molf_final_save = False
        self._molf_pushing = False
        super().__init__(*args, **kwargs)
        if routing_logs:
            MoLFRoutingCallback.attach(self)

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            a = self.args
            kwargs: dict[str, Any] = {
                "lr": a.learning_rate,
                "weight_decay": a.weight_decay,
                "betas": (a.adam_beta1, a.adam_beta2),
                "eps": a.adam_epsilon,
            }
            if self.molf_lora_lr is not None:
                kwargs["lora_lr"] = self.molf_lora_lr
            if self.molf_lora_weight_decay is not None:
                kwargs["lora_weight_decay"] = self.molf_lora_weight_decay
            self.optimizer = _build_molf_adamw(self.model if model is None else model, kwargs)
            return self.optimizer
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Trainer's checkpoints call save_model(..., _internal_call=True); a final save
        # does not, and neither does push_to_hub's in spirit (it uploads the final model).
        self._molf_final_save = not _internal_call or self._molf_pushing
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._molf_final_save = False

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        self._molf_pushing = True
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._molf_pushing = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _molf_model(self.accelerator.unwrap_model(self.model))
        if model is None or not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        if state_dict is None:
            state_dict = model.state_dict()
        state_dict = merged_state_dict(model, state_dict, keep_experts=not self._molf_final_save)
        super()._save(output_dir, state_dict=state_dict)
        if not self._molf_final_save:
            path = os.path.join(output_dir or self.args.output_dir, "molf_config.json")
            with open(path, "w") as f:
                json.dump(model.molf_config.to_dict(), f, indent=2)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A checkpoint's merged weights (plain names) are unexpected keys for the MoLF
        # model by design: do not warn about them.
        model = _molf_model(self.accelerator.unwrap_model(self.model))
        if model is not None:
            plain = {
                f"{n}.{s}" if n else s for n, _ in molf_modules(model) for s in ("weight", "bias")
            }
            load_result.unexpected_keys[:] = [
                k for k in load_result.unexpected_keys if k not in plain
            ]
        super()._issue_warnings_after_load(load_result)


class MoLFTrainer(MoLFTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`MoLFTrainerMixin`: MoLFAdamW from the
    ``TrainingArguments`` (plus ``lora_lr``, ``lora_weight_decay``), routing shares in
    the logs, merged final saves and exactly resumable checkpoints."""
