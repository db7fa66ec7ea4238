"""Read a run directory written by ``molf train``, finished or still in progress.

Every problem with the input is a :class:`MolfError` naming the file (and line); only a
torn *last* line of a JSONL log, what a killed writer leaves, is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from molf.errors import MolfError
from molf.jsonl import by_step, read_jsonl

log = logging.getLogger("molf.report")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MolfError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise MolfError(f"{path}:1: expected a JSON object")
    return obj


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        obj = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise MolfError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise MolfError(f"{path}:1: expected a mapping of settings")
    return obj


@dataclass
class Run:
    """What a run directory holds, as read at one moment."""

    path: Path
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    train_log: dict[int, dict[str, Any]] = field(default_factory=dict)  # step -> record
    evals: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def routing_path(self) -> Path:
        return self.path / "routing.jsonl"

    @property
    def has_routing(self) -> bool:
        return self.routing_path.is_file()

    @property
    def finished(self) -> bool:
        """Evaluated after training (``eval.json`` has ``after``)."""
        return isinstance(self.evals.get("after"), dict)

    @property
    def last_step(self) -> int | None:
        return max(self.train_log) if self.train_log else None


def load_run(path: Path, label: str | None = None) -> Run:
    """Read ``config.yaml``, ``train_log.jsonl`` and ``eval.json`` of a run directory
    (each may be missing while a run is in progress, but not all of the first two)."""
    path = Path(path)
    if not path.exists():
        raise MolfError(f"{path}: no such run directory")
    if not path.is_dir():
        raise MolfError(f"{path}: not a directory (expected a run directory of molf train)")
    config_path, log_path, eval_path = (
        path / "config.yaml",
        path / "train_log.jsonl",
        path / "eval.json",
    )
    if not config_path.is_file() and not log_path.is_file():
        raise MolfError(
            f"{path}: not a molf run directory (no config.yaml or train_log.jsonl; "
            "pass the --output-dir of molf train)"
        )
    run = Run(path=path, label=label or path.resolve().name)
    if config_path.is_file():
        run.config = _read_yaml(config_path)
    if log_path.is_file():
        run.train_log = {s: r for s, (_, r) in by_step(log_path, read_jsonl(log_path)).items()}
    if eval_path.is_file():
        run.evals = _read_json(eval_path)
    return run


def series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one numeric field of the training log (missing/null skipped)."""
    steps, values = [], []
    for step, rec in run.train_log.items():
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(step)
            values.append(float(v))
    return steps, values


def lr_keys(run: Run) -> list[str]:
    """The learning-rate fields logged: ``lr`` and any per-group ``lr_*`` / ``lr/*``."""
    keys = dict.fromkeys(k for rec in run.train_log.values() for k in rec)
    return [k for k in keys if k == "lr" or k.startswith(("lr_", "lr/"))]
