"""What ``molf train`` checks before it touches anything, and its resume policy.

:func:`preflight` runs every check that can fail on the settings alone (the run
directory, the tracker, the hub token, the method's settings) and prints the warnings;
on ``--resume`` it compares the settings with the run's own config.yaml: a setting that
changes the result (not in :data:`RESUME_FREE`) is refused unless
``--allow-changed-settings``; one that decides the checkpoint's parameters and their
shapes is refused always.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.train.args import TrainArgs
from molf.train.checkpoint import PATTERN as CHECKPOINT_PATTERN
from molf.train.checkpoint import list_checkpoints
from molf.train.distributed import DistContext
from molf.train.export import check_hub_token
from molf.train.logs import say
from molf.train.method_names import default_train_non_linear
from molf.train.methods import check_method_settings, method_of, preflight_warnings
from molf.train.rundir import check_run_dir
from molf.yamlfile import load_yaml


def preflight(args: TrainArgs, ctx: DistContext) -> tuple[list[str], dict[str, Any]]:
    """Refuse what cannot run, before any model loads or file is written; print the
    warnings (rank 0). Returns the changed settings a ``--resume`` continues with (as
    :func:`resume_changes` words them) and the run's own settings (empty without
    ``--resume``)."""
    run_dir = Path(args.output_dir)
    check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)
    changes, own = resume_changes(run_dir, args, ctx.world_size) if args.resume else ([], {})
    check_tracker(args.report_to)
    check_hub_token(args.push_to_hub)
    check_method_settings(args)
    if args.eval_metrics and ctx.mode == "fsdp2":
        raise MolfError(
            "--eval-metrics: the task's metrics need the whole model on one process, and "
            "--parallel fsdp2 shards it; drop --eval-metrics (the eval loss of --eval-steps "
            "works under FSDP2) or train with --parallel ddp"
        )
    if args.dtype == "bf16":
        say(
            "warning: --dtype bf16 trains bf16 weights with no fp32 copy: an update smaller "
            "than bf16's resolution (about 1/256 of a weight) is lost; --dtype amp-bf16 "
            "keeps fp32 weights and computes in bf16",
            ctx.is_main,
        )
    for warning in preflight_warnings(args):
        say(warning, ctx.is_main)
    return changes, own


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
    "check_routing", "parallel", "eval_metrics",
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


def absolute_paths(args: TrainArgs) -> dict[str, str]:
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


def resume_changes(
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
        return default_train_non_linear(values.get("method"))
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


def refuse_shorter_run(run_dir: Path, args: TrainArgs, total: int) -> None:
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
