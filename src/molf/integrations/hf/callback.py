"""Routing shares in Trainer's logs: :class:`MoLFRoutingCallback` counts the experts
MoLFAdamW selects at each step (on the device), adds the shares to each training log
under the keys ``molf train`` uses, and warns (rank 0) when routing collapses."""

from __future__ import annotations

import logging

import torch
from transformers import DefaultFlowCallback, Trainer, TrainerCallback

from molf.integrations.hf.discovery import find_molf_model, find_molf_optimizer
from molf.optim import Routing
from molf.routing_stats import (
    CollapseWatch,
    LoraExpert,
    RoutingCounts,
    RoutingSetup,
    collapse_warning,
)

logger = logging.getLogger("molf")


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

    At the start of training it warns once when the model is a MoLF model but the
    Trainer's optimizer is not MoLFAdamW (the one ``args.optim`` names): nothing would be
    routed.
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
        self._warned_optim = False
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
        return cb

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._counts, self._decisions, self._steps, self._seen = None, None, 0, None
        self._step_wins, self._watch = [], None
        opt, molf = find_molf_optimizer(optimizer), find_molf_model(model)
        if molf is not None and opt is None:
            self._warn_not_routed(args, optimizer, state)
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

    def _warn_not_routed(self, args, optimizer, state) -> None:
        """Warn once (rank 0) that the Trainer trains a MoLF model with an optimizer that
        is not MoLFAdamW (the one ``args.optim`` names): nothing is routed."""
        if self._warned_optim or not state.is_world_process_zero:
            return
        self._warned_optim = True
        optim = getattr(args.optim, "value", args.optim)
        logger.warning(
            "the model is a MoLF model but the Trainer trains it with %s (optim=%r), not "
            "MoLFAdamW: every expert is updated at every step, nothing is routed. Use "
            "MoLFTrainer, or Trainer(optimizer_cls_and_kwargs=(MoLFAdamWFactory, "
            "molf_adamw_kwargs(args))), or Trainer(optimizers=(MoLFAdamW(model, ...), None))",
            type(getattr(optimizer, "optimizer", optimizer)).__name__,
            optim,
        )

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
