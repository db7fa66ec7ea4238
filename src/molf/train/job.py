"""``molf train`` as one job, from resolved :class:`TrainArgs` to a run directory.

Run directory: ``config.yaml`` (resolved args), ``train_log.jsonl``, ``routing.jsonl``
(molf methods), ``eval.json`` (metrics before and after), ``checkpoint-N/``, ``final/``;
and one row appended to ``results.csv`` in the parent of the run directory.

:func:`run_train` sets up the process group and SIGTERM handling and runs a
:class:`TrainJob`, whose state lives on the job:

- :meth:`TrainJob.setup`: every check that can fail (:func:`~molf.train.preflight.preflight`),
  the task and its data, the model and tokenizer, the batch plan and the method's
  wrapping, all before the run directory is touched;
- :meth:`TrainJob.train`: under the run directory's lock, the evaluation before
  training, the optimizer and schedule, a resume, the loop and the last checkpoint;
- :meth:`TrainJob.finish`: the evaluation after training and the records (rank 0),
  ``final/`` and the upload.

Under torchrun every rank trains its slice of each global batch; rank 0 alone evaluates
and writes the logs, routing, results and final model."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from molf.atomic import DISK_ERRNOS
from molf.model import parameter_summary
from molf.tasks.encoding import ensure_pad_token, use_chat_template
from molf.train.args import TrainArgs
from molf.train.checkpoint import load_latest_checkpoint, prune_checkpoints, write_checkpoint
from molf.train.data import Batches
from molf.train.distributed import (
    DistContext,
    barrier,
    gather_for_saving,
    init_distributed,
    install_routing_reduce,
    shutdown,
    unwrap,
    wrap_model,
)
from molf.train.eval_steps import step_evaluator
from molf.train.evaluation import evaluate, load_task
from molf.train.export import push_command, push_final, save_final
from molf.train.logs import RunLogger, format_metrics, peak_memory_mb, say
from molf.train.loop import LoopContext, train_loop
from molf.train.methods import (
    build_optimizer,
    load_method_state,
    method_of,
    method_state,
    wrap,
)
from molf.train.model_card import model_card
from molf.train.modeling import load_model_and_tokenizer, model_ref
from molf.train.preflight import preflight, refuse_shorter_run
from molf.train.records import append_results_row, read_eval, write_config, write_eval
from molf.train.rundir import RunDir, start_run_dir
from molf.train.stop import SigtermStop, disk_failure


def run_train(args: TrainArgs) -> dict[str, Any]:
    """Train, evaluate before and after, save the final model; returns ``eval.json``'s dict."""
    ctx = init_distributed(args.parallel, args.dist_timeout)
    run_dir = Path(args.output_dir)
    stop = SigtermStop(run_dir)
    try:
        with stop.installed():
            return TrainJob(args, ctx, stop).run()
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise disk_failure(e, run_dir) from None
    finally:
        shutdown(ctx)


class TrainJob:
    """One ``molf train`` run on this process (see the module docstring)."""

    def __init__(self, args: TrainArgs, ctx: DistContext, stop: SigtermStop) -> None:
        self.args, self.ctx, self.stop = args, ctx, stop
        self.main = ctx.is_main
        self.run_dir = RunDir(Path(args.output_dir))
        self.results: dict[str, Any] = {}
        # Training seconds over every attempt: checkpoints carry the total so far, so a
        # resumed run counts the killed attempt's time up to the checkpoint it resumed.
        self.seconds_before = 0.0
        self.started = time.perf_counter()
        self.evaluator = None  # --eval-steps
        self.early_state: dict[str, Any] = {}  # early stopping, from a checkpoint

    def run(self) -> dict[str, Any]:
        """setup, then train and finish under the run directory's lock (rank 0 holds it)."""
        self.setup()
        barrier(self.ctx)
        args = self.args
        path, resume, overwrite = self.run_dir.path, args.resume, args.overwrite
        lock = start_run_dir(path, resume=resume, overwrite=overwrite) if self.main else None
        try:
            if self.train():
                self.finish()
            return self.results
        finally:
            if lock is not None:
                lock.release()

    # -- setup: nothing written yet --------------------------------------------------

    def setup(self) -> None:
        """Check everything, then load the task, data and model and plan the batches."""
        args = self.args
        self.changes, self.own = preflight(args, self.ctx)
        self.ref = model_ref(args.model, args.gguf_file)  # a wrong path fails before any work
        self.task, self.data = load_task(args)
        say(
            f"task {args.task}: {len(self.data.train)} training examples, "
            f"{len(self.data.eval)} eval records from {self.data.source}",
            self.main,
        )
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        self._setup_model()
        self._setup_batches()
        if args.resume:
            refuse_shorter_run(self.run_dir.path, args, self.total)
        # Wrapping validates ranks and targets; fresh adapters leave outputs unchanged,
        # so "before" metrics can be taken on the wrapped model.
        self.model = wrap(self.model, args, self.total)

    def _setup_model(self) -> None:
        args, ref = self.args, self.ref
        model, tokenizer, _, _ = load_model_and_tokenizer(ref.name, ref.gguf_file, args.dtype)
        use_chat_template(tokenizer, args.chat_template)
        say(
            f"model {ref.name}{' (' + ref.gguf_file + ')' if ref.gguf_file else ''}: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
            self.main,
        )
        model.config.pad_token_id = ensure_pad_token(tokenizer)
        self.model, self.tokenizer = model.to(self.ctx.device), tokenizer

    def _setup_batches(self) -> None:
        args, ctx = self.args, self.ctx
        max_length = args.max_length
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            max_length = positions  # longer examples could not be encoded: cut them there
            say(
                f"--max-length {args.max_length} > the model's {positions} positions: "
                f"using {positions}",
                self.main,
            )
        self.batches = Batches(
            self.data.train,
            self.tokenizer,
            max_length,
            self.model.config.pad_token_id,
            args.batch_size,
            args.grad_accum,
            args.seed,
            ctx.rank,
            ctx.world_size,
        )
        self.total = self.batches.plan.total_steps(args.max_steps, args.epochs)
        self.end, self.max_length = self.total, max_length  # end: early stopping may cut it

    # -- train: the run directory is ours --------------------------------------------

    def train(self) -> bool:
        """Evaluate before, build the optimizer, resume, run the loop and checkpoint its
        end; False when a resumed run turns out to be finished already."""
        args = self.args
        if self.main and not args.resume:
            write_config(self.run_dir.path, args, self.ctx, self.ref, [])
        self.results = read_eval(self.run_dir.path)
        if self.main and args.eval_before and "before" not in self.results:
            self._evaluate_before()
        barrier(self.ctx)
        self._setup_optimizer()
        self.start, self.recorded = 0, False
        if args.resume and not self._resume():
            return False
        say(f"{args.method}: {parameter_summary(unwrap(self.model))}", self.main)
        say(
            f"{self.total} steps of {self.batches.plan.global_batch} examples "
            f"({self.ctx.world_size} process(es), parallel={self.ctx.mode})",
            self.main,
        )
        self._loop()
        if self.start < self.end:
            # Always resumable before the final evaluation and save: a failure there (full
            # disk, a crash, SIGTERM) is redone with --resume instead of costing training.
            self.stop.stage = "the checkpoint of the last step"
            self.checkpoint(self.end)
        self.stop.raise_if_requested()  # SIGTERM during the last step: stop, resumable
        return True

    def _evaluate_before(self) -> None:
        self.stop.stage = "the evaluation before training"
        before = self._evaluate("before")
        self.results.update(before=before, baselines=self.task.baselines(self.data.eval))
        self.results["evaluated"] = self.data.evaluated
        write_eval(self.run_dir.path, self.results)
        say(f"before training: {format_metrics(before)}")

    def _evaluate(self, stage: str) -> dict[str, float]:
        return evaluate(
            self.task,
            self.model,
            self.tokenizer,
            self.data.eval,
            self.args,
            self.run_dir.path,
            stage,
        )

    def _setup_optimizer(self) -> None:
        from transformers import get_scheduler

        args = self.args
        self.stop.stage = "the setup of training"
        if args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            self.model.config.use_cache = False
        self.model = wrap_model(self.model, self.ctx)
        self.optimizer = build_optimizer(unwrap(self.model), args)
        install_routing_reduce(self.optimizer, self.ctx)
        self.scheduler = get_scheduler(
            "constant_with_warmup" if args.scheduler == "constant" else args.scheduler,
            self.optimizer,
            num_warmup_steps=int(args.warmup_ratio * self.total),
            num_training_steps=self.total,
        )

    @property
    def _shard_rank(self) -> int | None:
        """This process's rank for sharded checkpoints (None without a process group)."""
        return self.ctx.rank if self.ctx.active else None

    def checkpoint(self, step: int) -> None:
        """``checkpoint-<step>/``: model, optimizer, schedule, the method's state and the
        training seconds so far."""
        seconds = self.seconds_before + time.perf_counter() - self.started
        extra = {**method_state(self.model, self.args), "train_seconds": seconds}
        if self.evaluator is not None:
            extra["early_stopping"] = self.evaluator.early.record()
        write_checkpoint(
            self.run_dir.path,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            self.args.save_total_limit,
            extra,
            self._shard_rank,
        )

    def _resume(self) -> bool:
        """Load the newest checkpoint; False when the run is finished already (its record
        complete and its model saved, or not wanted). A run whose record is complete and
        only lacks its model is finished by saving it, without re-evaluating."""
        args, run_dir = self.args, self.run_dir
        self.stop.stage = "the resume"
        self.start, extra = load_latest_checkpoint(
            run_dir.path,
            self.model,
            self.optimizer,
            self.scheduler,
            self._shard_rank,
            lambda msg: say(msg, self.main),
        )
        load_method_state(self.model, args, extra)
        self.seconds_before = float(extra.get("train_seconds", 0.0))
        say(f"resumed from checkpoint-{self.start} (step {self.start} of {self.total})", self.main)
        self.early_state = extra.get("early_stopping") or {}
        self.end = self.early_state.get("stopped_at") or self.total
        self.recorded = self.start == self.end and "after" in self.results
        model_was_saved = self.own.get("save_model", True) is not False
        if self.recorded and (run_dir.has_final or not (model_was_saved or args.save_model)):
            say(f"{run_dir.path} is already finished: nothing to do", self.main)
            return False
        if self.main and (self.changes or model_was_saved != args.save_model):
            history = self.own.get("resume_changes", [])
            if self.changes:
                say(f"warning: continuing with changed settings: {'; '.join(self.changes)}")
                history = [*history, {"step": self.start, "changes": self.changes}]
            write_config(run_dir.path, args, self.ctx, self.ref, history)  # save_model too
        return True

    def _loop(self) -> None:
        self.logger = RunLogger(
            self.run_dir.path, self.args.report_to, self.args.to_dict(), enabled=self.main
        )
        self.logger.truncate(self.start)
        self.evaluator = step_evaluator(
            self.args, self.task, self.data, self.tokenizer, self.max_length, self.ctx,
            self.early_state,
        )  # fmt: skip
        loop_ctx = LoopContext(
            run_dir=self.run_dir.path,
            device=self.ctx.device,
            logger=self.logger,
            dist=self.ctx,
            checkpoint=self.checkpoint,
            stop_requested=self.stop.requested,
            evaluator=self.evaluator,
        )
        self.stop.stage, self.stop.between_steps = "training", True
        try:
            self.started = time.perf_counter()
            if self.start < self.end:  # else stopped early already
                self.end = train_loop(
                    self.model, self.optimizer, self.scheduler, self.batches, self.args,
                    loop_ctx, self.start, self.total,
                )  # fmt: skip
        finally:
            self.stop.between_steps = False
        self.train_seconds = self.seconds_before + time.perf_counter() - self.started

    # -- finish: records, final/, upload ---------------------------------------------

    def finish(self) -> None:
        """Gather the model (every rank joins), then on rank 0 evaluate and record the
        run unless its record is complete, save ``final/`` and upload it if asked."""
        skipped = self.optimizer.skipped_steps if method_of(self.args).routed else None
        self.stop.stage = "the gathering of the model"
        self.model = gather_for_saving(self.model, self.ctx, self._fresh_model)
        if self.main:
            if not self.recorded:
                self._record(skipped)
            self.logger.close()
            self._save()
        else:
            self.logger.close()
        barrier(self.ctx)

    def _fresh_model(self) -> torch.nn.Module:
        """The base model, freshly loaded and wrapped by the method (FSDP2's gather)."""
        args, ref = self.args, self.ref
        fresh, _, _, _ = load_model_and_tokenizer(ref.name, ref.gguf_file, args.dtype)
        return wrap(fresh, args, self.total)

    def _record(self, skipped: int | None) -> None:
        """eval.json, the logs' results and the results.csv row (written before final/:
        a failed save then leaves a complete record, which --resume does not redo)."""
        self.stop.stage = "the evaluation after training"
        results = self.results
        results["after"] = self._evaluate("after")
        results["baselines"] = self.task.baselines(self.data.eval)
        results["evaluated"] = self.data.evaluated
        results["train_seconds"] = self.train_seconds
        if self.args.early_stopping_patience:  # self.evaluator: built by _loop
            results["early_stopping"] = self.evaluator.early.record()
        results["peak_memory_mb"] = peak_memory_mb(self.ctx.device)
        if skipped is not None:
            results["skipped_steps"] = skipped
        write_eval(self.run_dir.path, results)
        self.logger.log_results(results)
        say(f"after training:  {format_metrics(results['after'])}")
        append_results_row(
            self.run_dir.path,
            self.args,
            self.ref,
            self.task.primary_metric,
            self.end,
            results,
        )

    def _save(self) -> None:
        """``final/`` with its model card (unless ``save_model`` is off), drop the
        checkpoints kept only for safety, and upload when ``--push-to-hub``."""
        args, ref, run_dir = self.args, self.ref, self.run_dir.path
        final = run_dir / "final"
        if args.save_model:
            self.stop.stage = "the final save"
            card = model_card(
                args, ref.hub_id or ref.name, {**self.results, "steps": self.end}, run_dir, ref
            )
            source = {"base_model": ref.name, "gguf_file": ref.gguf_file, "hub_id": ref.hub_id}
            final = save_final(self.model, self.tokenizer, args, run_dir, source, card)
            say(f"saved {final}")
        else:
            say("the trained model is not saved (save_model is off)")
        if not args.save_steps:
            prune_checkpoints(run_dir, keep=0)  # kept only until the record and final/ were safe
        if args.push_to_hub:
            self.stop.stage = "the upload"
            self.stop.hint = (
                f"the run is saved; upload it with {push_command(run_dir, args.push_to_hub)}"
            )
            say(f"uploaded to the Hub: {push_final(final, args.push_to_hub)}")
