"""The sweep file: a grid of models x tasks x methods x learning rates x seeds.

``load_sweep(path)`` reads the YAML, expands ``${VAR}`` in string values, checks every
key, and builds :class:`~molf.train.args.TrainArgs` for every cell the sweep could run
(every learning-rate point on every seed, both splits), so a bad value fails here, with
the place it came from, before any cell runs.

Layout (see ``docs/protocol.md``)::

    output_dir: runs/study-cpu        # the sweep directory; every cell is a run dir in it
    launcher: null                    # the command that runs molf (default: python -m molf)
    summary: null                     # summary.csv to read and write (default: in output_dir);
                                      # selection.json and results.md are written beside it
    settings: {max_steps: 16, ...}    # TrainArgs fields shared by every cell
    models: {NAME: {model: ID, ...}}  # model: hub id or directory (default: NAME)
    tasks: {NAME: {task: fact, data: ..., ...}}        # task: default NAME; select_with:
                                      # TASK reuses TASK's lr choice (no val cells of its own)
    methods: {NAME: {method: molf, lr: [...], lora_lr: [...], ...}}  # method: default NAME
    seeds: [0, 1]                     # test seeds; stage 1 (lr choice) runs on select_seed
    select_seed: 0                    # default: the first seed
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.sweep.grid import Group, LrPoint, Sweep, all_possible_cells

TOP_KEYS = (
    "output_dir",
    "launcher",
    "summary",
    "settings",
    "models",
    "tasks",
    "methods",
    "seeds",
    "select_seed",
)
# Settings the sweep itself decides for each cell: never given in a section.
SWEEP_OWNED = frozenset({"output_dir", "resume", "overwrite", "seed", "eval_split"})
# Which TrainArgs field each section's own key sets (the others may not set it).
SECTION_FIELD = {"models": "model", "tasks": "task", "methods": "method"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any, where: str) -> Any:
    """``${VAR}`` in every string of ``value`` replaced by the environment's value."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in os.environ:
                raise MolfError(f"{where}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]

        return ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MolfError(f"{where}: must be a mapping, got {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def _settings(raw: dict[str, Any], where: str, allowed: set[str]) -> dict[str, Any]:
    """TrainArgs settings of one section, keys normalised (``-`` -> ``_``) and checked."""
    from molf.train.args import TrainArgs

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in SWEEP_OWNED:
            raise MolfError(f"{where}: {key!r} is set by the sweep for each cell; remove it")
        if name in allowed:
            out[name] = value
        elif name in fields:
            raise MolfError(f"{where}: {key!r} cannot be set here (see docs/protocol.md)")
        else:
            raise MolfError(f"{where}: unknown setting {key!r}")
    return out


def _lr_list(value: Any, where: str, required: bool) -> list[float | None]:
    if value is None:
        if required:
            raise MolfError(f"{where}: missing (a learning rate or a list of them)")
        return [None]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise MolfError(f"{where}: empty list; give at least one learning rate")
    out: list[float | None] = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            lr = float(item)  # YAML reads 1e-5 (no dot) as a string
        except (TypeError, ValueError):
            raise MolfError(f"{where}: {item!r} is not a number") from None
        if not (math.isfinite(lr) and lr > 0):
            raise MolfError(f"{where}: {item!r} must be a positive, finite learning rate")
        out.append(lr)
    return out


def _points(raw: dict[str, Any], where: str) -> tuple[LrPoint, ...]:
    """``lr`` and ``lora_lr`` lists zipped into points (a single lora_lr goes with each lr)."""
    lrs = _lr_list(raw.get("lr"), f"{where}.lr", required=True)
    lora = _lr_list(raw.get("lora_lr"), f"{where}.lora_lr", required=False)
    if len(lora) == 1:
        lora = lora * len(lrs)
    if len(lora) != len(lrs):
        raise MolfError(
            f"{where}: lr has {len(lrs)} values but lora_lr has {len(lora)}; they are zipped "
            "into (lr, lora_lr) pairs, so give as many of each (or one lora_lr)"
        )
    return tuple(LrPoint(a, b) for a, b in zip(lrs, lora))  # type: ignore[arg-type]


def _section(raw: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    entries = _mapping(raw.get(key), key)
    if not entries:
        raise MolfError(f"{key}: empty; the grid needs at least one entry")
    out = {}
    for name, body in entries.items():
        if not NAME.match(name):
            raise MolfError(
                f"{key}.{name}: names become directory names; use letters, digits, '.', '_', "
                f"'+', '-' (put a hub id or path in '{SECTION_FIELD[key]}:')"
            )
        out[name] = _mapping(body, f"{key}.{name}")
    return out


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise MolfError(f"{where}: empty list; give at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in items):
        raise MolfError(f"{where}: seeds must be integers, got {items!r}")
    if len(set(items)) != len(items):
        raise MolfError(f"{where}: duplicated seed in {items!r}")
    return tuple(items)


def _train_args(values: dict[str, Any], where: str) -> Any:
    """TrainArgs for a cell's values (coerced and validated like a --config file)."""
    from molf.train.args import resolve_args

    try:
        return resolve_args(None, values)
    except MolfError as e:
        raise MolfError(f"{where}: {e}") from None


def _check_data(settings: dict[str, Any], where: str) -> None:
    """The file or directory that ``data`` names, as its task reads it (Spider's
    ``DIR#by-question``: DIR), must exist."""
    from molf.tasks import get_task

    data = settings.get("data")
    if data is None:
        return
    try:
        path = get_task(str(settings["task"])).data_path(str(data)).path
    except MolfError as e:
        raise MolfError(f"{where}: {e}") from None
    if path is not None and not path.exists():
        raise MolfError(f"{where}: data {path} does not exist")


def _select_with(tasks: dict[str, dict[str, Any]]) -> dict[str, str]:
    """task -> the task whose lr choice it reuses, popped from each task entry's
    ``select_with``; the named task must exist and choose its own lr."""
    out = {}
    for task, body in tasks.items():
        source = body.pop("select_with", None)
        if source is None:
            continue
        if source not in tasks or source == task:
            others = ", ".join(t for t in tasks if t != task) or "none"
            raise MolfError(
                f"tasks.{task}.select_with: {source!r} is not another task of this sweep "
                f"(tasks: {others})"
            )
        out[task] = str(source)
    for task, source in out.items():
        if source in out:
            raise MolfError(
                f"tasks.{task}.select_with: {source!r} reuses another task's choice itself; "
                f"name the task that chooses ({out[source]!r})"
            )
    return out


def load_sweep(path: str | Path, summary: str | None = None) -> Sweep:
    """Read and validate a sweep file; raises MolfError naming the bad key or value."""
    from molf.yamlfile import load_yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise MolfError(f"sweep config {path} does not exist")
    raw = expand_env(_mapping(load_yaml(path, "molf sweep"), str(path)), str(path))
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise MolfError(
            f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_KEYS)}"
        )
    if not raw.get("output_dir"):
        raise MolfError(f"{path}: output_dir (the sweep directory) is required")
    seeds = _seeds(raw.get("seeds", [0]), "seeds")
    select_seed = raw.get("select_seed", seeds[0])
    if isinstance(select_seed, bool) or not isinstance(select_seed, int):
        raise MolfError(f"select_seed: must be an integer, got {select_seed!r}")
    sweep_dir = Path(str(raw["output_dir"]))
    launcher = raw.get("launcher")
    sweep = Sweep(
        path=path,
        output_dir=sweep_dir,
        launcher=tuple(shlex.split(str(launcher))) if launcher else (sys.executable, "-m", "molf"),
        summary=Path(summary or raw.get("summary") or sweep_dir / "summary.csv"),
        groups=_groups(raw),
        seeds=seeds,
        select_seed=select_seed,
    )
    _check_cells(sweep)
    return sweep


def _groups(raw: dict[str, Any]) -> tuple[Group, ...]:
    """Every (model, task, method entry) of the file, with its merged settings (later
    sections win: settings, model, task, method) and lr points."""
    from molf.train.args import TrainArgs

    fields = {f.name for f in dataclasses.fields(TrainArgs)}
    owned_by_section = set(SECTION_FIELD.values()) | {"lr", "lora_lr"}
    shared = _settings(
        _mapping(raw.get("settings"), "settings"), "settings", fields - owned_by_section
    )
    models, tasks, methods = (_section(raw, k) for k in ("models", "tasks", "methods"))
    select_with = _select_with(tasks)
    groups = []
    for model, m_raw in models.items():
        m = _settings(m_raw, f"models.{model}", fields - owned_by_section | {"model"})
        m.setdefault("model", model)
        for task, t_raw in tasks.items():
            t = _settings(t_raw, f"tasks.{task}", fields - owned_by_section | {"task"})
            t.setdefault("task", task)
            _check_data({**shared, **m, **t}, f"tasks.{task}")
            for method, e_raw in methods.items():
                e = _settings(e_raw, f"methods.{method}", fields - {"model", "task"})
                e.setdefault("method", method)
                source = select_with.get(task)
                chooser = f"{model}/{source}/{method}" if source else None
                groups.append(_group(model, task, method, {**shared, **m, **t, **e}, chooser))
    return tuple(groups)


def _group(
    model: str, task: str, method: str, merged: dict[str, Any], select_with: str | None
) -> Group:
    """One group from its merged settings (``lr`` and ``lora_lr`` become its points)."""
    from molf.tasks import get_task

    points = _points(merged, f"methods.{method}")
    settings = {k: v for k, v in merged.items() if k not in ("lr", "lora_lr")}
    args = _train_args({**settings, "lr": points[0].lr}, f"{model}/{task}/{method}")
    metric = get_task(args.task).primary_metric
    return Group(model, task, method, settings, points, metric, select_with=select_with)


def _check_cells(sweep: Sweep) -> None:
    """Unique cell names, and TrainArgs accepts every cell's settings."""
    seen: set[str] = set()
    for cell in all_possible_cells(sweep):
        if cell.name in seen:
            raise MolfError(
                f"{cell.name}: this cell appears twice in the grid (duplicated learning rate?)"
            )
        seen.add(cell.name)
        _train_args(cell.values(sweep.output_dir), cell.name)
