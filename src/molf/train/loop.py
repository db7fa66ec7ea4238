"""The training loop shared by every method: same data order, schedule and clipping."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from molf.errors import Interrupted
from molf.optim import MoLFAdamW
from molf.routing_stats import (
    CollapseWatch,
    LoraExpert,
    RoutingCounts,
    RoutingSetup,
    collapse_warning,
    moved,
)
from molf.tasks.encoding import IGNORE_INDEX
from molf.train.args import TrainArgs
from molf.train.data import Batches
from molf.train.distributed import DistContext, all_reduce_sum, check_routing_agrees, unwrap
from molf.train.eval_steps import StepEvaluator
from molf.train.logs import RunLogger, format_metrics
from molf.train.methods import after_optimizer_step, method_of


@dataclass
class LoopContext:
    """What the loop needs besides model, optimizer and data (set up by
    :class:`~molf.train.job.TrainJob`)."""

    run_dir: Path
    device: torch.device
    logger: RunLogger
    dist: DistContext
    checkpoint: Callable[[int], None]  # saves a checkpoint after the given step
    stop_requested: Callable[[], bool] = lambda: False  # e.g. SIGTERM: checkpoint and stop
    evaluator: StepEvaluator | None = None  # --eval-steps (None: off)


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP's and PEFT's wrappers."""
    model = unwrap(model)  # DDP
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def keeps_target_logits(model: nn.Module, args: TrainArgs) -> bool:
    """Whether the loop computes logits only where a label is read (see
    :func:`target_loss`): the model's forward takes ``logits_to_keep`` (transformers'
    causal LMs do), the method leaves the loss to the loop, and nothing is compiled
    (the number of kept positions changes every step)."""
    if args.compile or method_of(args).adds_to_loss:
        return False
    return "logits_to_keep" in inspect.signature(_hf_model(model).forward).parameters


def target_positions(labels: Tensor) -> Tensor:
    """The sequence positions whose logits some row's loss reads: position ``t``
    predicts ``labels[:, t + 1]``."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def target_loss(
    forward: Callable, batch: dict[str, Tensor], positions: Tensor, num_targets: int
) -> Tensor:
    """The causal-LM loss of ``batch`` summed over its target tokens and divided by
    ``num_targets`` (the global batch's), as transformers computes it from ``labels``,
    with logits only at ``positions`` (:func:`target_positions` of the labels, taken
    before the batch moved to its device: reading them there would wait for it).
    Prompts without a loss (a task's question, a SQL schema) then cost no
    ``hidden x vocab`` projection: with Gemma-3's 262k-token vocabulary that projection
    and its float32 logits are most of a step's time and memory."""
    positions = positions.to(batch["labels"].device, non_blocking=True)
    out = forward(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=positions,
    )
    logits = out.logits.float()  # transformers' loss upcasts too
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch["labels"][:, positions + 1].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / num_targets


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches: Batches,
    args: TrainArgs,
    ctx: LoopContext,
    start_step: int,
    total_steps: int,
) -> int:
    """Run optimizer steps ``start_step .. total_steps - 1``; returns the number of
    steps done (fewer than ``total_steps`` when early stopping ends the run).

    The loss of a step is the sum of token losses over the whole global batch divided
    by its number of target tokens, accumulated over micro-batches (and ranks). Every
    ``--eval-steps`` step the evaluator's values join the step's record.
    """
    steps = Steps(model, optimizer, scheduler, args, ctx, total_steps)
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        disable=not ctx.dist.is_main,
        dynamic_ncols=True,
    )
    summary_every = max(1, total_steps // 10)  # a routing line at most ~10 times a run
    next_summary = start_step + summary_every
    done, early = start_step, False
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        loss, tokens = steps.accumulate(*batches.step(step))
        grad_norm = steps.update(step)
        done = step + 1
        steps.record_routing(done)
        seconds = time.perf_counter() - t0
        evals, early = steps.evaluate(done)
        if done % args.logging_steps == 0 or done == total_steps or evals:
            record = steps.log(done, loss, tokens, grad_norm, seconds, evals)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )
            if done >= next_summary or done == total_steps:
                steps.watch.summarize(ctx.logger.routing_total)
                next_summary = done + summary_every
        bar.update(1)
        if early:
            break
        stop = done < total_steps and _agreed(ctx.stop_requested(), ctx)
        if done < total_steps and (stop or (args.save_steps and done % args.save_steps == 0)):
            ctx.checkpoint(done)
        if stop:
            bar.close()
            raise Interrupted(done, saved=True)
    bar.close()
    if early and ctx.dist.is_main:
        tqdm.write(f"[molf] {ctx.evaluator.early.message()}")
    steps.watch.finish()
    return done


class Steps:
    """One optimizer step's parts, on the loop's model, optimizer and schedule."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        args: TrainArgs,
        ctx: LoopContext,
        total_steps: int,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.args, self.ctx, self.total_steps = args, ctx, total_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = ctx.dist.world_size  # DDP and FSDP2 average gradients over ranks: undo
        model.train()
        # --compile: a compiled view of the same module (same parameters), training only
        self.forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
        # amp-bf16: fp32 weights and optimizer, the forward (and so the backward) in bf16
        self.autocast = torch.autocast(
            ctx.device.type, dtype=torch.bfloat16, enabled=args.dtype == "amp-bf16"
        )
        self.target_logits = keeps_target_logits(model, args)
        self.watch = RoutingWatch(args, total_steps, enabled=ctx.dist.is_main)
        self.routed = isinstance(optimizer, MoLFAdamW)

    def accumulate(self, micro: list[dict[str, Tensor]], num_targets: int) -> tuple[Tensor, Tensor]:
        """Forward and backward over the step's micro-batches; the summed loss and the
        number of tokens (on the device: nothing waits for them)."""
        device = self.ctx.device
        loss, tokens = torch.zeros((), device=device), torch.zeros((), device=device)
        for mb in micro:
            positions = target_positions(mb["labels"]) if self.target_logits else None
            mb = {k: v.to(device) for k, v in mb.items()}
            with self.autocast:
                if positions is None:
                    micro_loss = self.forward(**mb, num_items_in_batch=num_targets).loss
                else:
                    micro_loss = target_loss(self.forward, mb, positions, num_targets)
            (micro_loss * self.world).backward()
            loss += micro_loss.detach()
            tokens += mb["attention_mask"].sum()
        return loss, tokens

    def update(self, step: int) -> Tensor | None:
        """Clip, step the optimizer (MoLFAdamW gets the global norm: under FSDP2 every
        rank then skips a non-finite step alike), the method's hook and the schedule;
        returns the gradient norm before clipping (None without clipping)."""
        args = self.args
        grad_norm = None
        if args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, args.max_grad_norm)
        if self.routed:
            self.optimizer.step(grad_norm=grad_norm)
        else:
            self.optimizer.step()
        after_optimizer_step(self.model, args, step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def record_routing(self, done: int) -> None:
        """The step's routing into routing.jsonl and the collapse watch (MoLF methods)."""
        routing = self.optimizer.last_routing if self.routed else None
        if routing is None:
            return
        if self.args.check_routing:
            check_routing_agrees(self.optimizer, self.ctx.dist)
        wins, decisions = self.ctx.logger.log_routing(done, routing)
        self.watch.add(done, routing.experts, wins, decisions)

    def evaluate(self, done: int) -> tuple[dict[str, float], bool]:
        """The evaluator's values after step ``done`` when it is an ``--eval-steps``
        step (every rank), and whether early stopping ends the run; ({}, False) else."""
        evaluator = self.ctx.evaluator
        if evaluator is None or done % self.args.eval_steps:
            return {}, False
        evals, early = evaluator(self.model, done, self.autocast, done == self.total_steps)
        if self.ctx.dist.is_main:
            tqdm.write(f"[molf] step {done}: {format_metrics(evals)}")
        return evals, early

    def log(
        self,
        done: int,
        loss: Tensor,
        tokens: Tensor,
        grad_norm: Tensor | None,
        seconds: float,
        evals: dict[str, float] | None = None,
    ) -> dict[str, float | None]:
        """train_log.jsonl's record of the step (loss and tokens summed over ranks), with
        the step's evaluation (``eval_loss``, ``eval_<metric>``) when it has one."""
        loss, tokens = all_reduce_sum(torch.stack([loss, tokens]), self.ctx.dist).tolist()
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        record = {
            "step": done,
            "loss": loss,
            "lr": float(self.scheduler.get_last_lr()[0]),
            **_lora_lr(self.optimizer),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_s": tokens / seconds,
            "step_time": seconds,
            **(evals or {}),
        }
        self.ctx.logger.log_train(record)
        return record


class RoutingWatch:
    """The console side of routing in ``molf train`` (rank 0): the summary line when an
    expert's share moved by more than a point since the last line printed, and the collapse
    warning (:mod:`molf.routing_stats`) once when routing collapses, again at the end
    if it is still collapsed."""

    def __init__(self, args: TrainArgs, total_steps: int, enabled: bool) -> None:
        self.args, self.enabled = args, enabled
        self.warmup_steps = int(args.warmup_ratio * total_steps)
        self.watch: CollapseWatch | None = None
        self.printed: np.ndarray | None = None

    def setup(self) -> RoutingSetup:
        a = self.args
        lora = [LoraExpert(r, al, a.use_rslora) for r, al in zip(a.lora_ranks, a.lora_alphas)]
        return RoutingSetup(
            a.lr, a.effective_lora_lr, lora, has_fft=method_of(a).trains_base, score=a.score
        )

    def add(self, step: int, experts: list[str], wins: np.ndarray, decisions: int) -> None:
        if not self.enabled:
            return
        if self.watch is None:
            self.watch = CollapseWatch(experts, self.args.top_k, self.warmup_steps)
        collapse = self.watch.add(step, wins, decisions)
        if collapse is not None:
            tqdm.write(f"[molf] {collapse_warning(collapse, self.setup())}")

    def summarize(self, counts: RoutingCounts | None) -> None:
        if not self.enabled or counts is None or not counts.decisions.sum():
            return
        shares = counts.expert_shares()
        if moved(self.printed, shares):
            tqdm.write(f"[molf] {counts.summary()}")
            self.printed = shares

    def finish(self) -> None:
        collapse = None if self.watch is None else self.watch.current()
        if self.enabled and collapse is not None:
            tqdm.write(f"[molf] at the end: {collapse_warning(collapse, self.setup())}")


def _agreed(flag: bool, ctx: LoopContext) -> bool:
    """Whether any rank asked to stop (every rank must stop at the same step)."""
    if not ctx.dist.active:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=ctx.device), ctx.dist).item())


def _lora_lr(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The LoRA experts' scheduled lr (``lr_lora``) when it has its own parameter group."""
    for group in optimizer.param_groups:
        if str(group.get("name", "")).startswith("lora"):
            return {"lr_lora": float(group["lr"])}
    return {}
