"""How long a sweep's cells will take, from the cells it has finished (``--dry-run``).

A cell costs ``steps x (seconds per step) + examples x (seconds per evaluated example)``.
Both rates are measured on a finished cell of the same model and task (the same method
entry preferred): seconds per step = its ``train_seconds / steps``; seconds per evaluated
example = the rest of its wall time (start-up, evaluation, saving) over the examples it
evaluated. A cell's steps are ``max_steps``, else ``ceil(epochs x max_train_samples /
global batch)``; its examples ``max_eval_samples``. When a count is unknown (no cap:
the whole split), the finished cell's own time for that part stands in for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from molf.sweep.grid import Cell
from molf.sweep.results import Row, number


def planned_steps(args: Any) -> int | None:
    """The optimizer steps a cell's settings ask for (None: they depend on the data)."""
    if args.max_steps:
        return int(args.max_steps)
    if args.max_train_samples:
        batch = args.batch_size * args.grad_accum
        return math.ceil(args.epochs * args.max_train_samples / batch)
    return None


def size_text(args: Any) -> str:
    """``steps x global batch`` (or ``epochs x batch``) as the listing shows it."""
    batch = args.batch_size * args.grad_accum
    if args.max_steps:
        return f"{args.max_steps} x {batch}"
    return f"{args.epochs:g} epochs x {batch}"


@dataclass(frozen=True)
class Rates:
    """What one finished cell measured: seconds per step and per evaluated example (None
    where its count is unknown, then ``train`` / ``rest`` seconds stand in)."""

    cell: str
    train: float
    rest: float
    per_step: float | None
    per_example: float | None

    def seconds(self, steps: int | None, examples: int | None) -> tuple[float, float]:
        """(training, the rest) seconds of a cell of ``steps`` and ``examples``."""
        train = self.train if steps is None or self.per_step is None else steps * self.per_step
        rest = (
            self.rest
            if examples is None or self.per_example is None
            else examples * self.per_example
        )
        return train, rest


def measured_rates(row: Row, args: Any) -> Rates | None:
    """The rates of a finished cell's summary row (``args``: the cell's settings)."""
    train, wall = number(row.get("train_seconds")), number(row.get("wall_seconds"))
    if math.isnan(train):
        return None
    rest = max(0.0, wall - train) if not math.isnan(wall) else 0.0
    recorded = number(row.get("steps"))
    steps = planned_steps(args) if math.isnan(recorded) else int(recorded)
    examples = args.max_eval_samples
    return Rates(
        cell=row["cell"],
        train=train,
        rest=rest,
        per_step=train / steps if steps else None,
        per_example=rest / examples if examples else None,
    )


def reference(
    cell: Cell, rows: Iterable[Row], kind: Callable[[str], str | None], args_of: Callable
) -> Rates | None:
    """The rates of the finished cell closest to ``cell``: same model and task kind
    (``kind(task section) -> task``), its method entry preferred, the latest last."""
    same = [
        r
        for r in rows
        if r.get("status") == "ok"
        and r.get("model") == cell.group.model
        and kind(r.get("task", "")) == kind(cell.group.task)
        and r.get("train_seconds")
    ]
    same.sort(key=lambda r: r.get("method_label") == cell.group.method)
    for row in reversed(same):
        args = args_of(row["cell"])
        rates = measured_rates(row, args) if args is not None else None
        if rates is not None:
            return rates
    return None


def estimate_text(args: Any, rates: Rates) -> tuple[str, float]:
    """The listing's cost text of a cell and its estimated wall seconds."""
    steps, examples = planned_steps(args), args.max_eval_samples
    train, rest = rates.seconds(steps, examples)
    how = f"train ~{train:.0f} s"
    if steps is not None and rates.per_step is not None:
        how += f": {steps} steps x {rates.per_step:.1f} s"
    if examples is not None and rates.per_example is not None:
        how += f"; eval ~{rest:.0f} s: {examples} examples x {rates.per_example:.2f} s"
    else:
        how += f"; the rest ~{rest:.0f} s"
    wall = train + rest
    return f"{size_text(args)}, ~{wall:.0f} s ({how}; from {rates.cell})", wall
