"""What a run records about itself: ``config.yaml`` (its settings, as a ``--config`` and
as ``--resume`` compares them), ``eval.json`` (metrics before and after training, the
task's baselines, time and memory) and its row of ``results.csv`` in the parent
directory (one row per finished run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from molf.atomic import write_text_atomic
from molf.train.args import TrainArgs
from molf.train.distributed import DistContext
from molf.train.logs import append_result
from molf.train.modeling import ModelRef
from molf.train.preflight import absolute_paths


def write_config(
    run_dir: Path,
    args: TrainArgs,
    ctx: DistContext,
    ref: ModelRef,
    resume_changes: list[dict[str, Any]],
) -> None:
    """config.yaml: the resolved settings, what they resolved to, and (after a resume
    with --allow-changed-settings) the step and list of each change; the keys beyond
    the settings are :data:`~molf.train.args.RECORDED_KEYS`, so the file is a valid
    ``--config`` that replays the run."""
    config = {
        **args.to_dict(),
        "resolved_model": ref.name,
        "resolved_gguf_file": ref.gguf_file,
        "hub_id": ref.hub_id,
        "absolute_paths": absolute_paths(args),
        "world_size": ctx.world_size,
        "parallel_mode": ctx.mode,
    }
    if resume_changes:
        config["resume_changes"] = resume_changes
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def read_eval(run_dir: Path) -> dict[str, Any]:
    """The run's eval.json so far (empty before the first evaluation)."""
    path = run_dir / "eval.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_eval(run_dir: Path, results: dict[str, Any]) -> None:
    """Replace eval.json with ``results``."""
    write_text_atomic(run_dir / "eval.json", json.dumps(results, indent=2))


def append_results_row(
    run_dir: Path,
    args: TrainArgs,
    ref: ModelRef,
    primary_metric: str,
    steps: int,
    results: dict[str, Any],
) -> None:
    """The run's row of ``results.csv`` beside its directory: its settings, the primary
    metric before and after training, every metric after, time and peak memory."""
    append_result(
        run_dir.parent / "results.csv",
        {
            **args.to_dict(),
            "output_dir": str(run_dir),
            "model": ref.name,
            "steps": steps,
            "lora_lr": args.effective_lora_lr,
            "primary_metric": primary_metric,
            "before": results.get("before", {}).get(primary_metric),
            "after": results["after"].get(primary_metric),
            "metrics_after": json.dumps(results["after"]),
            "train_seconds": round(results["train_seconds"], 2),
            "peak_memory_mb": round(results["peak_memory_mb"], 1),
        },
    )
