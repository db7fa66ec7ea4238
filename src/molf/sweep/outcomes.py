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

A cell that logged routing (molf, molf-e) also keeps where its optimizer routed, from
``routing.jsonl`` (decided module-steps only, as :class:`~molf.routing_stats.RoutingCounts`
counts them): ``"routing": {"experts": [...], "all": [share per expert], "by_type":
{type: [...]}, "by_tenth": [[...] per tenth of the logged steps]}``, so the routing of
the study's cells can be compared (across N, say) once their run directories are gone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from molf.atomic import write_text_atomic
from molf.errors import MolfError
from molf.routing_stats import RoutingCounts

Outcome = dict[str, Any]


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
    out = {"cell": cell, "metric": metric, "prompts": digest, "correct": "".join(correct)}
    routing = routing_summary(run_dir)
    return {**out, "routing": routing} if routing else out


def routing_summary(run_dir: Path) -> dict[str, Any] | None:
    """Each expert's share of the decided module-steps of ``run_dir``'s routing log:
    overall, per module type and per tenth of the logged steps (None without a log)."""
    from molf.routing_log import routing_matrix

    if not (run_dir / "routing.jsonl").is_file():
        return None
    matrix = routing_matrix(run_dir)
    if not matrix.steps.size:
        return None
    counts = matrix.counts()

    def shares(values: np.ndarray) -> list[float]:
        return [round(float(v), 4) for v in values]

    tenths = np.array_split(np.arange(matrix.steps.size), min(10, matrix.steps.size))
    by_tenth = []
    for part in tenths:
        chunk = RoutingCounts(matrix.modules, matrix.experts)
        for s in part:
            chunk.add(int(matrix.steps[s]), matrix.selected[:, s], matrix.scores[:, s])
        by_tenth.append(shares(chunk.expert_shares()))
    return {
        "experts": matrix.experts,
        "all": shares(counts.expert_shares()),
        "by_type": {t: shares(v) for t, v in counts.type_shares().items()},
        "by_tenth": by_tenth,
    }


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
            if not isinstance(row.get("correct"), str) or not isinstance(row.get("prompts"), str):
                raise ValueError
            if not isinstance(row.get("routing", {}), dict):
                raise ValueError
            out[str(row["cell"])] = row
        except (ValueError, KeyError, TypeError, AttributeError):
            raise MolfError(
                f"{path}:{number}: not an outcome line; restore it or delete the line "
                "(its cell's intervals are then left out)"
            ) from None
    return out


def write_outcomes(path: Path, outcomes: dict[str, Outcome]) -> None:
    """Replace ``outcomes.jsonl`` with ``outcomes``, one line per cell, sorted by cell."""
    lines = [json.dumps(outcomes[cell]) + "\n" for cell in sorted(outcomes)]
    write_text_atomic(path, "".join(lines))
