"""A training or evaluation job from resolved :class:`TrainArgs` to a run directory.

Run directory: ``config.yaml`` (resolved args), ``train_log.jsonl``, ``routing.jsonl``
(molf methods), ``eval.json`` (metrics before and after), ``checkpoint-N/``, ``final/``;
and one row appended to ``results.csv`` in the parent of the run directory.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from molf.atomic import DISK_ERRNOS, Terminated, interrupt, write_text_atomic
from molf.errors import MolfError
from molf.model import parameter_summary
from molf.ownership import TEMP_PREFIX, claim, refuse_foreign
from molf.tasks import TaskData, get_task
from molf.tasks.encoding import ensure_pad_token, use_chat_template
from molf.train.args import EVAL_SETTINGS, TrainArgs
from molf.train.checkpoint import PATTERN as CHECKPOINT_PATTERN
from molf.train.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    prune_checkpoints,
    write_checkpoint,
)
from molf.train.data import Batches
from molf.train.distributed import (
    DistContext,
    barrier,
    init_distributed,
    install_routing_reduce,
    shutdown,
    unwrap,
    wrap_model,
)
from molf.train.export import check_hub_token, push_command, push_final, save_final
from molf.train.logs import RunLogger, append_result, parse_record, peak_memory_mb
from molf.train.loop import LoopContext, train_loop
from molf.train.methods import (
    build_optimizer,
    check_method_settings,
    load_method_state,
    method_of,
    method_state,
    wrap,
)
from molf.train.model_card import model_card
from molf.train.modeling import (
    hub_id,
    load_complete_adapter,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model,
)
from molf.train.rundir import RunLock, check_run_dir, start_run_dir
from molf.yamlfile import load_yaml


def _say(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(f"[molf] {msg}", flush=True)


def check_tracker(report_to: str) -> None:
    """Fail before any work when the chosen tracker is not installed."""
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if module is not None and importlib.util.find_spec(module) is None:
        raise MolfError(f"--report-to {report_to}: install it with pip install {module}")


# Settings that do not change what a run computes: free to differ on --resume.
RESUME_FREE = {
    "resume", "overwrite", "allow_changed_settings", "output_dir", "report_to",
    "wandb_project", "wandb_run_name", "logging_steps", "save_steps", "save_total_limit",
    "save_model", "save_merged", "save_dtype", "push_to_hub", "eval_batch_size", "dist_timeout",
    "check_routing", "parallel",
}  # fmt: skip


PATH_SETTINGS = ("data", "model", "gguf_file")

# Settings that decide which parameters a run trains and their shapes: a checkpoint holds
# exactly those, so they may not differ on --resume, not even with
# --allow-changed-settings (another rank would load rank-r tensors into other shapes).
# lora_alphas and use_rslora only scale the same tensors, like a new lr: they may change
# with --allow-changed-settings (the experts' contribution jumps by the new/old scale).
SHAPE_SETTINGS = ("model", "gguf_file", "method")
ADAPTER_SHAPE_SETTINGS = ("lora_ranks", "target_modules")  # molf, molf-e and PEFT methods
ROUTED_SHAPE_SETTINGS = ("train_non_linear",)  # molf, molf-e: which params the optimizer holds


def _absolute_paths(args: TrainArgs) -> dict[str, str]:
    """The path settings that name existing files, made absolute: a resume from another
    directory, or with the path spelled differently, still finds them equal."""
    values = {key: getattr(args, key) for key in PATH_SETTINGS}
    return {k: os.path.abspath(v) for k, v in values.items() if v and os.path.exists(v)}


def _same_setting(key: str, saved: dict[str, Any], now: Any) -> bool:
    """Equal values, or two spellings of one existing path (relative vs absolute, links)."""
    if saved[key] == now:
        return True
    if key not in PATH_SETTINGS or not isinstance(now, str) or not os.path.exists(now):
        return False
    before = saved.get("absolute_paths", {}).get(key, saved[key])
    try:
        return os.path.samefile(before, now)
    except OSError:
        return False


def _resume_changes(
    run_dir: Path, args: TrainArgs, world_size: int
) -> tuple[list[str], dict[str, Any]]:
    """Every setting that changes the run's result and differs from the run's own, as
    ``--flag NEW (the run used OLD)``, refused (MolfError) unless
    ``--allow-changed-settings``; and the run's own settings (its config.yaml, read here
    by every rank before rank 0 may rewrite it)."""
    saved = load_yaml(run_dir / "config.yaml", "--resume")
    now = {**args.to_dict(), "world_size": world_size}
    _refuse_shape_changes(run_dir, args, saved or {})
    changed = [
        f"--{key.replace('_', '-')} {now[key]!r} (the run used {saved[key]!r})"
        for key in now
        if key not in RESUME_FREE and key in saved and not _same_setting(key, saved, now[key])
    ]
    if changed and not args.allow_changed_settings:
        raise MolfError(
            f"--resume: {run_dir} was started with other settings: {'; '.join(changed)}. "
            "Resume with the run's own settings (they are in its config.yaml), start a new "
            "run, or continue with the new ones on purpose with --allow-changed-settings"
        )
    return changed, saved or {}


def _shape_settings(args: TrainArgs) -> tuple[str, ...]:
    """The settings of ``args.method`` that decide its parameters and their shapes."""
    method = method_of(args)
    keys = SHAPE_SETTINGS
    if method.routed or method.peft:
        keys += ADAPTER_SHAPE_SETTINGS
    if method.routed:
        keys += ROUTED_SHAPE_SETTINGS
    return keys


def _effective(key: str, values: dict[str, Any]) -> Any:
    """A setting as it takes effect (``train_non_linear`` None is the method's default)."""
    if key == "train_non_linear" and values.get(key) is None:
        return values.get("method") == "molf"
    return values.get(key)


def _refuse_shape_changes(run_dir: Path, args: TrainArgs, saved: dict[str, Any]) -> None:
    """MolfError when a setting that decides the checkpoint's parameters or their shapes
    (:func:`_shape_settings`) differs from the run's own, even with
    --allow-changed-settings: the checkpoint cannot be loaded into another model."""
    now = args.to_dict()
    changed = [
        f"--{key.replace('_', '-')} {_effective(key, now)!r} "
        f"(the run used {_effective(key, saved)!r})"
        for key in _shape_settings(args)
        if key in saved
        and _effective(key, now) != _effective(key, saved)
        and not _same_setting(key, saved, now[key])
    ]
    if changed:
        raise MolfError(
            f"--resume: {run_dir} cannot continue with {'; '.join(changed)}: these settings "
            "decide which parameters its checkpoint holds and their shapes, so they cannot "
            "change, not even with --allow-changed-settings; resume with the run's own "
            "values (in its config.yaml) or start a new run (--overwrite or another "
            "--output-dir)"
        )


def _refuse_shorter_run(run_dir: Path, args: TrainArgs, total: int) -> None:
    """MolfError when a resumed run would end before its latest checkpoint's step: it
    would train nothing and record the smaller step count."""
    latest = list_checkpoints(run_dir)[-1]
    step = int(CHECKPOINT_PATTERN.search(latest.name).group(1))
    if total >= step:
        return
    length = (
        f"--max-steps {args.max_steps}"
        if args.max_steps is not None
        else f"--epochs {args.epochs} ({total} steps)"
    )
    raise MolfError(
        f"--resume: {length} ends before {run_dir}'s checkpoint {latest.name} (step "
        f"{step}); pass --max-steps {step} or more to continue it, or start a new run "
        "(--overwrite or another --output-dir)"
    )


def load_task(args: TrainArgs) -> tuple[Any, TaskData]:
    task = get_task(args.task)
    data = task.load(
        args.data,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        seed=args.seed,
        split=args.eval_split,
    )
    return task, data


def _evaluate(
    task, model, tokenizer, records, args: TrainArgs, out_dir: Path | None, stage: str
) -> dict[str, float]:
    """The task's metrics on ``records``; each example's output goes to
    ``out_dir/predictions.jsonl`` (when given) as one line tagged with ``stage``."""
    predictions: list[dict[str, Any]] = []
    metrics = task.evaluate(
        model,
        tokenizer,
        records,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens or task.max_new_tokens,
        predictions=predictions,
    )
    if out_dir is not None:
        write_predictions(out_dir / "predictions.jsonl", stage, predictions)
    return metrics


def write_predictions(path: Path, stage: str, rows: list[dict[str, Any]]) -> None:
    """Replace the ``stage`` lines of a predictions file, keeping the other stages' lines
    (a file molf did not write is refused before it is read)."""
    claim(path)
    lines = _other_stages(path, stage) + [json.dumps({"stage": stage, **row}) for row in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _other_stages(path: Path, stage: str) -> list[str]:
    """The lines of the predictions file ``path`` (if any) of stages other than ``stage``;
    a line that is not a JSON object is a MolfError naming ``path:line``."""
    if not path.exists():
        return []
    kept = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = parse_record(raw)
        except ValueError as e:
            raise MolfError(
                f"{path}:{number}: {e}; molf writes one JSON object per line there: "
                "restore that line, or move the file away (its other stages' lines are "
                "then not kept)"
            ) from None
        if record.get("stage") != stage:
            kept.append(raw.decode("utf-8"))
    return kept


def run_train(args: TrainArgs) -> dict[str, Any]:
    """Train, evaluate before and after, save the final model; returns ``eval.json``'s dict.

    Under torchrun every rank trains its slice of each global batch; rank 0 alone
    evaluates and writes logs, routing, results and the final model.
    """
    ctx = init_distributed(args.parallel, args.dist_timeout)
    run_dir = Path(args.output_dir)
    stop = SigtermStop(run_dir)
    try:
        with stop.installed():
            return _run_train(args, ctx, stop)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise disk_failure(e, run_dir) from None
    finally:
        shutdown(ctx)


class DiskFull(MolfError):
    """The disk filled up (or the quota ran out) while the run wrote: exit code 1, since
    nothing about the input is wrong; the message says how to go on."""

    exit_code = 1


def disk_failure(error: OSError, run_dir: Path) -> MolfError:
    """One line for a full (:class:`DiskFull`) or read-only disk met while writing the
    run in ``run_dir``: the path, and how to go on."""
    where = Path(error.filename) if error.filename else run_dir
    if where.name.startswith(TEMP_PREFIX):  # molf's temporary: name what it was for
        where = where.parent
    hint = continue_hint(run_dir)
    if error.errno == errno.EROFS:
        return MolfError(
            f"--output-dir: cannot write {where}: read-only file system; make it writable "
            f"and {hint}, or give a writable --output-dir"
        )
    return DiskFull(
        f"{error.strerror} while writing {where}; nothing half-written was kept: free "
        f"some space, then {hint}"
    )


def continue_hint(run_dir: Path) -> str:
    """How to go on with the run in ``run_dir`` after it stopped: ``--resume`` from its
    newest checkpoint, or (none written) the same command again."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        return f"continue with --resume (from {checkpoints[-1].name})"
    return "start the run again (the same command: no checkpoint was written)"


class SigtermStop:
    """SIGTERM during ``molf train`` (what schedulers send before killing a job).

    Between training steps (:attr:`between_steps`) it only sets a flag: the loop
    finishes its step, writes a checkpoint and stops. Anywhere else it raises
    :class:`Terminated` at once: molf's atomic writers then leave the old file or
    directory and remove their temporaries (a directory being renamed into place is
    finished first), and the message names the :attr:`stage` and says whether
    ``--resume`` continues the run (:func:`continue_hint`, or :attr:`hint` when set)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stage = "the setup"
        self.hint: str | None = None
        self.between_steps = False
        self.received = False

    def requested(self) -> bool:
        return self.received

    def error(self) -> Terminated:
        hint = self.hint or continue_hint(self.run_dir)
        return Terminated(f"interrupted (SIGTERM) during {self.stage}; {hint}")

    def raise_if_requested(self) -> None:
        if self.received:
            raise self.error()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:  # a repeated signal: the first one is being acted on
            return
        self.received = True
        if not self.between_steps:
            interrupt(self.error)

    @contextmanager
    def installed(self) -> Iterator[SigtermStop]:
        """Handle SIGTERM this way inside the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def _run_train(args: TrainArgs, ctx: DistContext, stop: SigtermStop) -> dict[str, Any]:
    main = ctx.is_main
    run_dir = Path(args.output_dir)
    # Every check that can fail runs before the run directory is touched.
    check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
    changes, own = _resume_changes(run_dir, args, ctx.world_size) if args.resume else ([], {})
    check_tracker(args.report_to)
    check_hub_token(args.push_to_hub)
    check_method_settings(args)
    if args.dtype == "bf16":
        _say(
            "warning: --dtype bf16 trains bf16 weights with no fp32 copy: an update smaller "
            "than bf16's resolution (about 1/256 of a weight) is lost; --dtype amp-bf16 "
            "keeps fp32 weights and computes in bf16",
            main,
        )
    if args.method == "molf-e" and len(args.lora_ranks) == 1:
        _say(
            f"warning: --method molf-e with one rank ({args.lora_ranks[0]}) is plain rsLoRA: "
            "there is nothing to route; give two ranks, e.g. --lora-ranks 32,128 "
            "--lora-alphas 32,32",
            main,
        )
    resolve_model(args.model, args.gguf_file)  # a wrong path fails before any work
    task, data = load_task(args)
    _say(
        f"task {args.task}: {len(data.train)} training examples, {len(data.eval)} eval "
        f"records from {data.source}",
        main,
    )
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, tokenizer, name, gguf = load_model_and_tokenizer(args.model, args.gguf_file, args.dtype)
    use_chat_template(tokenizer, args.chat_template)
    _say(
        f"model {name}{' (' + gguf + ')' if gguf else ''}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        main,
    )
    max_length = args.max_length
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        max_length = positions  # longer examples could not be encoded: cut them there
        _say(
            f"--max-length {args.max_length} > the model's {positions} positions: "
            f"using {positions}",
            main,
        )
    pad_id = ensure_pad_token(tokenizer)
    model.config.pad_token_id = pad_id
    model.to(ctx.device)
    batches = Batches(
        data.train,
        tokenizer,
        max_length,
        pad_id,
        args.batch_size,
        args.grad_accum,
        args.seed,
        ctx.rank,
        ctx.world_size,
    )
    total = batches.plan.total_steps(args.max_steps, args.epochs)
    if args.resume:
        _refuse_shorter_run(run_dir, args, total)
    # Wrapping validates ranks and targets; fresh adapters leave outputs unchanged, so
    # "before" metrics can be taken on the wrapped model.
    model = wrap(model, args, total)
    barrier(ctx)
    lock = start_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite) if main else None
    try:
        return _train_in_run_dir(
            args, ctx, run_dir, task, data, model, tokenizer, batches, total, changes, own, stop
        )
    finally:
        if lock is not None:
            lock.release()


def _train_in_run_dir(
    args: TrainArgs,
    ctx: DistContext,
    run_dir: Path,
    task: Any,
    data: TaskData,
    model: nn.Module,
    tokenizer: Any,
    batches: Batches,
    total: int,
    changes: list[str],
    own: dict[str, Any],
    stop: SigtermStop,
) -> dict[str, Any]:
    from transformers import get_scheduler

    main = ctx.is_main
    name, gguf = resolve_model(args.model, args.gguf_file)
    if main and not args.resume:
        _write_config(run_dir, args, ctx, name, gguf, [])
    eval_path = run_dir / "eval.json"
    results: dict[str, Any] = json.loads(eval_path.read_text()) if eval_path.exists() else {}
    if main and args.eval_before and "before" not in results:
        stop.stage = "the evaluation before training"
        results["before"] = _evaluate(task, model, tokenizer, data.eval, args, run_dir, "before")
        results["baselines"] = task.baselines(data.eval)
        write_text_atomic(eval_path, json.dumps(results, indent=2))
        _say(f"before training: {_fmt(results['before'])}")
    barrier(ctx)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = wrap_model(model, ctx)
    optimizer = build_optimizer(unwrap(model), args)
    install_routing_reduce(optimizer, ctx)
    scheduler = get_scheduler(
        "constant_with_warmup" if args.scheduler == "constant" else args.scheduler,
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * total),
        num_training_steps=total,
    )

    # Training seconds over every attempt: checkpoints carry the total so far, so a
    # resumed run counts the killed attempt's time up to the checkpoint it resumed.
    clock = {"before": 0.0, "started": time.perf_counter()}
    rank = ctx.rank if ctx.active else None  # sharded checkpoints under a process group

    def checkpoint(step: int) -> None:
        seconds = clock["before"] + time.perf_counter() - clock["started"]
        extra = {**method_state(model, args), "train_seconds": seconds}
        write_checkpoint(
            run_dir, step, model, optimizer, scheduler, args.save_total_limit, extra, rank
        )

    start, recorded = 0, False
    if args.resume:
        start, extra = load_latest_checkpoint(
            run_dir, model, optimizer, scheduler, rank, lambda msg: _say(msg, main)
        )
        load_method_state(model, args, extra)
        clock["before"] = float(extra.get("train_seconds", 0.0))
        _say(f"resumed from checkpoint-{start} (step {start} of {total})", main)
        recorded = start == total and "after" in results  # only the model may be missing
        model_was_saved = own.get("save_model", True) is not False
        if recorded and ((run_dir / "final").is_dir() or not (model_was_saved or args.save_model)):
            _say(f"{run_dir} is already finished: nothing to do", main)
            return results
        if main and (changes or model_was_saved != args.save_model):
            history = own.get("resume_changes", [])
            if changes:
                _say(f"warning: continuing with changed settings: {'; '.join(changes)}")
                history = [*history, {"step": start, "changes": changes}]
            _write_config(run_dir, args, ctx, name, gguf, history)  # save_model too
    _say(f"{args.method}: {parameter_summary(unwrap(model))}", main)
    _say(
        f"{total} steps of {batches.plan.global_batch} examples ({ctx.world_size} "
        f"process(es), parallel={ctx.mode})",
        main,
    )
    logger = RunLogger(run_dir, args.report_to, args.to_dict(), enabled=main)
    logger.truncate(start)
    loop_ctx = LoopContext(
        run_dir=run_dir,
        device=ctx.device,
        logger=logger,
        dist=ctx,
        checkpoint=checkpoint,
        stop_requested=stop.requested,
    )
    stop.stage, stop.between_steps = "training", True
    try:
        clock["started"] = time.perf_counter()
        train_loop(model, optimizer, scheduler, batches, args, loop_ctx, start, total)
    finally:
        stop.between_steps = False
    seconds = clock["before"] + time.perf_counter() - clock["started"]
    if start < total:
        # Always resumable before the final evaluation and save: a failure there (full
        # disk, a crash, SIGTERM) is redone with --resume instead of costing the training.
        stop.stage = "the checkpoint of the last step"
        checkpoint(total)
    stop.raise_if_requested()  # SIGTERM during the last step: stop here, resumable
    skipped = optimizer.skipped_steps if method_of(args).routed else None
    stop.stage = "the gathering of the model"
    model = gather_for_saving(model, args, ctx, total)
    if main:
        _finish(
            args,
            run_dir,
            task,
            data,
            model,
            tokenizer,
            results,
            record=not recorded,
            logger=logger,
            seconds=seconds,
            skipped=skipped,
            total=total,
            device=ctx.device,
            stop=stop,
        )
    else:
        logger.close()
    barrier(ctx)
    return results


def _finish(
    args: TrainArgs,
    run_dir: Path,
    task: Any,
    data: TaskData,
    model: nn.Module,
    tokenizer: Any,
    results: dict[str, Any],
    *,
    record: bool,
    logger: RunLogger,
    seconds: float,
    skipped: int | None,
    total: int,
    device: torch.device,
    stop: SigtermStop,
) -> None:
    """The main process after training: evaluate and record the run (``eval.json``, the
    logs, ``results.csv``), save ``final/`` unless ``save_model`` is off, and upload it
    if asked. ``record`` False: a resumed run whose record is complete and only the model
    is missing (a failed save, or one run without its model): it is saved, not redone."""
    name, gguf = resolve_model(args.model, args.gguf_file)
    if record:
        stop.stage = "the evaluation after training"
        results["after"] = _evaluate(task, model, tokenizer, data.eval, args, run_dir, "after")
        results["baselines"] = task.baselines(data.eval)
        results["train_seconds"] = seconds
        results["peak_memory_mb"] = peak_memory_mb(device)
        if skipped is not None:
            results["skipped_steps"] = skipped
        write_text_atomic(run_dir / "eval.json", json.dumps(results, indent=2))
        logger.log_results(results)
        _say(f"after training:  {_fmt(results['after'])}")
        append_result(
            run_dir.parent / "results.csv",
            {
                **args.to_dict(),
                "output_dir": str(run_dir),
                "model": name,
                "steps": total,
                "lora_lr": args.effective_lora_lr,
                "primary_metric": task.primary_metric,
                "before": results.get("before", {}).get(task.primary_metric),
                "after": results["after"].get(task.primary_metric),
                "metrics_after": json.dumps(results["after"]),
                "train_seconds": round(results["train_seconds"], 2),
                "peak_memory_mb": round(results["peak_memory_mb"], 1),
            },
        )
    logger.close()
    final = run_dir / "final"
    if args.save_model:
        stop.stage = "the final save"
        final = save_final(
            model,
            tokenizer,
            args,
            run_dir,
            {"base_model": name, "gguf_file": gguf, "hub_id": hub_id(args.model)},
            model_card(args, hub_id(args.model) or name, {**results, "steps": total}, run_dir),
        )
        _say(f"saved {final}")
    else:
        _say("the trained model is not saved (save_model is off)")
    if not args.save_steps:
        prune_checkpoints(run_dir, keep=0)  # kept only until the record and final/ were safe
    if args.push_to_hub:
        stop.stage = "the upload"
        stop.hint = f"the run is saved; upload it with {push_command(run_dir, args.push_to_hub)}"
        _say(f"uploaded to the Hub: {push_final(final, args.push_to_hub)}")


def _write_config(
    run_dir: Path,
    args: TrainArgs,
    ctx: DistContext,
    name: str,
    gguf: str | None,
    resume_changes: list[dict[str, Any]],
) -> None:
    """config.yaml: the resolved settings, what they resolved to, and (after a resume
    with --allow-changed-settings) the step and list of each change."""
    config = {
        **args.to_dict(),
        "resolved_model": name,
        "resolved_gguf_file": gguf,
        "hub_id": hub_id(args.model),
        "absolute_paths": _absolute_paths(args),
        "world_size": ctx.world_size,
        "parallel_mode": ctx.mode,
    }
    if resume_changes:
        config["resume_changes"] = resume_changes
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def gather_for_saving(model: nn.Module, args: TrainArgs, ctx: DistContext, total: int) -> nn.Module:
    """The trained model as one plain (unsharded, unwrapped) module on rank 0.

    FSDP2: every rank joins the gather of the full state dict; rank 0 loads it into a
    freshly wrapped copy of the base model on the CPU."""
    if ctx.mode != "fsdp2":
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not ctx.is_main:
        return model
    fresh, _, _, _ = load_model_and_tokenizer(args.model, args.gguf_file, args.dtype)
    fresh = wrap(fresh, args, total)
    fresh.load_state_dict(full)
    return fresh


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def load_for_eval(model_dir: str | None, gguf_file: str | None, dtype: str) -> tuple[Any, Any]:
    """A plain model, or a PEFT adapter directory written by ``molf train`` (its base model
    is read from ``molf_run.json`` or ``adapter_config.json``)."""
    path = Path(model_dir) if model_dir else None
    if path is not None and (path / "adapter_config.json").is_file():
        run = (
            json.loads((path / "molf_run.json").read_text())
            if (path / "molf_run.json").is_file()
            else {}
        )
        base_name = run.get("base_model") or json.loads(
            (path / "adapter_config.json").read_text()
        ).get("base_model_name_or_path")
        base, _, _, _ = load_model_and_tokenizer(base_name, run.get("gguf_file"), dtype)
        return load_complete_adapter(base, path).eval(), load_tokenizer(str(path), None)
    model, tokenizer, _, _ = load_model_and_tokenizer(model_dir, gguf_file, dtype)
    return model, tokenizer


def run_settings(run_dir: Path) -> dict[str, Any]:
    """``molf eval --run RUN_DIR``: the run's final model with its evaluation settings."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise MolfError(f"--run: {run_dir} is not a run directory (no config.yaml)")
    saved = load_yaml(config, "--run")
    if not (run_dir / "final").is_dir():
        if saved.get("save_model", True) is False:
            raise MolfError(
                f"--run: {run_dir} was trained with save_model off, so it has no final/ "
                "model (its metrics are in eval.json)"
            )
        raise MolfError(f"--run: {run_dir} has no final/ model yet (finish it with --resume)")
    return {
        **{k: saved[k] for k in EVAL_SETTINGS if saved.get(k) is not None},
        "model": str(run_dir / "final"),
    }


def _warn_untrained_edits(args: TrainArgs) -> None:
    """Fact scores only mean something on the edits the model was trained on."""
    run_dir = Path(args.model or "").parent
    if args.task != "fact" or not (run_dir / "config.yaml").is_file():
        return
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    keys = ("data", "max_train_samples", "eval_split")
    differ = [k for k in keys if k in saved and saved[k] != getattr(args, k)]
    if differ or (args.max_eval_samples or 0) > (saved.get("max_train_samples") or 1e18):
        _say(
            f"warning: {args.model} was trained on other edits than the ones evaluated "
            f"here ({', '.join(differ) or 'max_eval_samples'} differ from its run); "
            f"scores of untrained edits are not efficacy. Use molf eval --run {run_dir}"
        )


@contextmanager
def holding_run(run_dir: Path | None) -> Iterator[None]:
    """While ``molf eval --run`` reads a run: the run's lock, so that no ``molf train``
    continues, replaces or deletes it meanwhile; refused (MolfError) while a training
    process (or another evaluation of it) holds it. A directory that is not a run (let
    :func:`run_settings` say so) or that this user cannot write is read unlocked."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        yield
        return
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except MolfError:
        holder = _lock_holder(lock.path)
        raise MolfError(
            f"--run: {run_dir} is in use by another molf process (pid {holder}): wait for "
            "it to end, then evaluate the run"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        lock = None  # a read-only run: nothing of ours can be writing it
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _lock_holder(path: Path) -> str:
    """The pid written in a lock file, or "unknown"."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def holds_training_run(directory: Path) -> bool:
    """Whether ``directory`` holds what ``molf train`` writes (its log, model,
    checkpoints, its config.yaml, or an eval.json with its "before" or train time), which
    an evaluation written there would partly replace."""
    if not directory.is_dir():
        return False
    if any((directory / name).exists() for name in ("train_log.jsonl", "final/molf_run.json")):
        return True
    if list_checkpoints(directory):
        return True
    return bool(
        {"resolved_model", "world_size"}
        <= _mapping(directory / "config.yaml", yaml.safe_load).keys()
        or {"before", "train_seconds"} & _mapping(directory / "eval.json", json.loads).keys()
    )


def _mapping(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds; empty when it is missing, unreadable or
    holds something else (a user's own file of that name)."""
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def check_eval_output(out: Path) -> None:
    """``molf eval --output-dir``: a new directory, one that holds other files, or an
    earlier evaluation's (its eval.json and predictions.jsonl are replaced); a training
    run's directory is refused: its own eval.json and predictions would be lost."""
    if out.exists() and not out.is_dir():
        raise MolfError(f"--output-dir: {out} is a file; choose a directory for the results")
    if holds_training_run(out):
        raise MolfError(
            f"--output-dir: {out} holds a molf training run, whose eval.json and "
            "predictions.jsonl this evaluation would replace; choose another --output-dir "
            "(a new directory)"
        )
    refuse_foreign(
        [out / "eval.json", out / "predictions.jsonl"],
        "molf eval replaces only results it wrote: choose another --output-dir",
    )


def run_eval(args: TrainArgs, write: bool) -> dict[str, float]:
    """``molf eval``: the task's metrics of a model or adapter, written to
    ``--output-dir`` (eval.json, predictions.jsonl) when ``write``."""
    out = Path(args.output_dir) if write else None
    if out is not None:
        check_eval_output(out)
    _warn_untrained_edits(args)
    task, data = load_task(args)
    model, tokenizer = load_for_eval(args.model, args.gguf_file, args.dtype)
    use_chat_template(tokenizer, args.chat_template)
    ensure_pad_token(tokenizer)
    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    metrics = _evaluate(task, model, tokenizer, data.eval, args, out, "after")
    if out is not None:
        results = {"after": metrics, "baselines": task.baselines(data.eval)}
        write_text_atomic(out / "eval.json", json.dumps(results, indent=2))
    return metrics


def push_run(run_dir: Path, repo_id: str | None) -> str:
    """``molf push RUN_DIR``: upload a finished run's ``final/`` to ``repo_id`` (default:
    the run's own ``--push-to-hub``) the way the end of training does, holding the run's
    lock meanwhile; returns the commit URL. What is missing or malformed is a MolfError;
    a failed upload an :class:`~molf.train.export.UploadFailed` that says to retry."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise MolfError(f"molf push: {run_dir} is not a run directory (no config.yaml)")
    repo_id = repo_id or load_yaml(config, "molf push").get("push_to_hub")
    if not repo_id:
        raise MolfError(
            f"molf push: {run_dir} was trained without --push-to-hub: give the repo with "
            "--push-to-hub OWNER/NAME"
        )
    check_hub_token(str(repo_id))
    with holding_run(run_dir):
        final = run_dir / "final"
        if not final.is_dir():
            raise MolfError(
                f"molf push: {run_dir} has no final/ model (finish the run with --resume; "
                "a run with save_model off has none)"
            )
        return push_final(final, str(repo_id))
