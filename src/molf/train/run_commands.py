"""``molf eval`` and ``molf push``: what molf does with a model or a finished run.

``molf eval`` scores a model, a PEFT adapter written by ``molf train`` or a run's
``final/`` (``--run``, with the run's own evaluation settings, holding the run's lock)
and writes ``eval.json`` and ``predictions.jsonl`` to a directory that is not a training
run's. ``molf push`` uploads a finished run's ``final/`` the way the end of training does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from molf.atomic import write_text_atomic
from molf.errors import MolfError
from molf.ownership import refuse_foreign
from molf.tasks.encoding import ensure_pad_token, use_chat_template
from molf.train.args import EVAL_SETTINGS, TrainArgs
from molf.train.checkpoint import list_checkpoints
from molf.train.evaluation import evaluate, load_task
from molf.train.export import check_hub_token, push_final
from molf.train.logs import say
from molf.train.modeling import load_complete_adapter, load_model_and_tokenizer, load_tokenizer
from molf.train.rundir import RunDir, holding_run
from molf.yamlfile import load_yaml


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
    run = RunDir(run_dir)
    if not run.has_final:
        if not run.saves_model:
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
        say(
            f"warning: {args.model} was trained on other edits than the ones evaluated "
            f"here ({', '.join(differ) or 'max_eval_samples'} differ from its run); "
            f"scores of untrained edits are not efficacy. Use molf eval --run {run_dir}"
        )


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
    metrics = evaluate(task, model, tokenizer, data.eval, args, out, "after")
    if out is not None:
        results = {
            "after": metrics,
            "baselines": task.baselines(data.eval),
            "evaluated": data.evaluated,
        }
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
