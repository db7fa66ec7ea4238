"""Per-example outcomes of a sweep's cells, kept beside ``summary.csv``.

A cell's run directory (and its ``predictions.jsonl``) is scratch space that a sweep
may not keep; the confidence intervals of :mod:`molf.sweep.stats` need each evaluated
example's result, so the sweep copies them into ``outcomes.jsonl``: one line per
finished cell,

    {"cell": NAME, "metric": "efficacy", "prompts": SHA256[:16], "correct": "0110..."}

``correct`` holds one character per example of the task's primary metric, in the order
the task evaluated them (``1``: won, ``0``: lost); ``prompts`` fingerprints the
examples' prompts in that order, so two cells are paired only when they scored the
same examples in the same order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from molf.atomic import write_text_atomic
from molf.errors import MolfError

Outcome = dict[str, str]


def cell_outcome(cell: str, run_dir: Path, metric: str) -> Outcome | None:
    """The outcome line of a finished cell from its ``predictions.jsonl`` ("after" stage;
    a task that tags its lines with a ``metric`` contributes that metric's lines only);
    None when the run kept no predictions."""
    path = run_dir / "predictions.jsonl"
    if not path.is_file():
        return None
    prompts, correct = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row: dict[str, Any] = json.loads(line)
        if row.get("stage") != "after" or row.get("metric", metric) != metric:
            continue
        prompts.append(str(row.get("prompt", "")))
        correct.append("1" if row.get("correct") else "0")
    if not correct:
        return None
    digest = hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:16]
    return {"cell": cell, "metric": metric, "prompts": digest, "correct": "".join(correct)}


def read_outcomes(path: Path) -> dict[str, Outcome]:
    """cell -> outcome line of an ``outcomes.jsonl`` (empty when there is none)."""
    if not path.is_file():
        return {}
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["cell"])] = {k: str(v) for k, v in row.items()}
        except (ValueError, KeyError, TypeError):
            raise MolfError(
                f"{path}:{number}: not an outcome line; restore it or delete the line "
                "(its cell's intervals are then left out)"
            ) from None
    return out


def write_outcomes(path: Path, outcomes: dict[str, Outcome]) -> None:
    """Replace ``outcomes.jsonl`` with ``outcomes``, one line per cell, sorted by cell."""
    lines = [json.dumps(outcomes[cell]) + "\n" for cell in sorted(outcomes)]
    write_text_atomic(path, "".join(lines))
