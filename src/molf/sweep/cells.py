"""One cell of a sweep on disk: its run directory ``D`` and the sidecars beside it
(``D.yaml``: the settings it last ran with; ``D.sweep.json``: attempts, wall time,
input hashes; ``D.log``: its output), how it is launched, and the checks that refuse a
run directory or summary row made with other settings, data or model than the cell's."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from molf.atomic import write_text_atomic
from molf.errors import MolfError
from molf.ownership import claim
from molf.sweep.grid import Cell, Sweep
from molf.sweep.process import run_child
from molf.sweep.results import Row, fingerprint, input_hashes
from molf.train.rundir import RunDir


def sidecar(run_dir: Path, suffix: str) -> Path:
    return run_dir.with_name(run_dir.name + suffix)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def launch(sweep: Sweep, cell: Cell, args: Any, state: str) -> tuple[int, float, Path]:
    """Run one cell as ``<launcher> train --config D.yaml [--resume | --overwrite]``
    (``state``: "new", "resume" or "restart"), its output appended to ``D.log``; returns
    the exit code, the wall seconds over every attempt and the log's path."""
    run_dir = Path(args.output_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = sidecar(run_dir, ".yaml")
    settings = {k: v for k, v in args.to_dict().items() if k not in ("resume", "overwrite")}
    write_text_atomic(config, yaml.safe_dump(settings, sort_keys=False))
    flags = {"resume": ["--resume"], "restart": ["--overwrite"], "new": []}[state]
    cmd = [*sweep.launcher, "train", "--config", str(config), *flags]
    record_path = sidecar(run_dir, ".sweep.json")
    record = read_json(record_path)
    attempt = int(record.get("attempts", 0)) + 1
    record = {**record, "attempts": attempt, "command": cmd, **input_hashes(args)}
    write_text_atomic(record_path, json.dumps(record, indent=2))  # counts killed attempts
    print(
        f"[sweep] {cell.name}: {'new' if state == 'new' else state} run (attempt {attempt})",
        flush=True,
    )
    log_path = sidecar(run_dir, ".log")
    claim(log_path)
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"=== attempt {attempt}: {shlex.join(cmd)}\n")
        log.flush()
        code = run_child(cmd, log)  # stopped with the sweep, never left running
    wall = float(record.get("wall_seconds", 0.0)) + time.monotonic() - start
    record.update(wall_seconds=round(wall, 2), returncode=code)
    write_text_atomic(record_path, json.dumps(record, indent=2))
    return code, wall, log_path


def check_run_dir(cell: Cell, args: Any, expected: str, inputs: Row) -> dict[str, Any]:
    """Refuse a run dir made with other settings than the cell's now, or a finished or
    resumable one made with other data or another model; the run's ``D.sweep.json``."""
    run_dir = Path(args.output_dir)
    config = sidecar(run_dir, ".yaml")  # the settings the cell last ran with
    if config.is_file() and run_dir.is_dir():
        saved = yaml.safe_load(config.read_text()) or {}
        check_same(cell, fingerprint(saved), expected, f"the run in {run_dir}")
    record = read_json(sidecar(run_dir, ".sweep.json"))
    if RunDir(run_dir).complete or RunDir(run_dir).checkpoints:  # what the sweep would keep
        check_inputs(cell, args, record, inputs, f"the run in {run_dir}")
    return record


def check_inputs(cell: Cell, args: Any, found: dict[str, Any], now: Row, where: str) -> None:
    """Refuse a result whose data, model or chat template content differs from what the
    cell reads now (``found`` without a hash: made before hashes were recorded,
    accepted)."""
    for column, what, value in (
        ("data_hash", "data", args.data or "the task's hub dataset"),
        ("model_hash", "model", args.model or "the default model"),
        ("template_hash", "chat template", args.chat_template),
    ):
        if found.get(column) and found[column] != now.get(column):
            raise MolfError(
                f"{cell.name}: {where} was made with other {what} than {value} holds now "
                f"({column} {found[column]}, now {now.get(column)}); restore the {what}, or "
                "delete that run (or row) to redo it"
            )


def check_same(cell: Cell, found: str | None, expected: str, where: str) -> None:
    if found and found != expected:
        raise MolfError(
            f"{cell.name}: {where} was made with other settings than the sweep file now "
            "gives this cell; restore the file, or delete that run (or row) to redo it"
        )
