"""The report's tables (runs, before/after metrics), rendered as Markdown or HTML."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from molf.report.runs import Run

LOWER_IS_BETTER = {"loss", "perplexity", "train_seconds", "peak_memory_mb"}
MISSING = "—"


@dataclass
class Table:
    """A titled table; ``best`` holds the (row, column) cells to mark as the best."""

    title: str
    header: list[str]
    rows: list[list[Any]]
    best: set[tuple[int, int]] = field(default_factory=set)
    note: str = ""


def fmt(value: Any) -> str:
    """A cell as text: floats with 4 decimals (1 when large, 3 significant digits in
    scientific notation when small, like learning rates), lists comma-joined."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if abs(value) >= 1000:
            return f"{value:.1f}"
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isnan(value) else float(value)
    return None


def runs_table(runs: Sequence[Run]) -> Table:
    """One row per run: its settings and how far it got."""
    rows = []
    for run in runs:
        c = run.config
        # what the user named (a short name, a hub id) over the local path it resolved to
        model = c.get("model") or c.get("hub_id") or c.get("resolved_model")
        total = c.get("max_steps")
        last = run.last_step
        progress = f"{last or 0}" + (f" / {total}" if isinstance(total, int) and total > 0 else "")
        status = "finished" if run.finished else "in progress or stopped"
        rows.append(
            [
                run.label,
                run.method,
                c.get("task"),
                model,
                c.get("lr"),
                c.get("lora_lr"),
                c.get("lora_ranks"),
                progress,
                status,
            ]
        )
    header = ["run", "method", "task", "model", "lr", "lora_lr", "lora_ranks", "steps", "status"]
    return Table("Runs", header, rows)


def _metric_names(dicts: Sequence[Any]) -> list[str]:
    names: dict[str, None] = {}
    for d in dicts:
        if isinstance(d, dict):
            names.update((k, None) for k, v in d.items() if _number(v) is not None)
    return list(names)


def single_run_table(run: Run) -> Table:
    """metric | before | after | delta (after - before) for one run."""
    before, after = run.evals.get("before") or {}, run.evals.get("after") or {}
    rows = []
    for name in _metric_names([before, after]):
        b, a = _number(before.get(name)), _number(after.get(name))
        delta = None if a is None or b is None else a - b
        rows.append([name, b, a, None if delta is None else f"{delta:+.4f}"])
    note = "" if run.finished else "No evaluation after training yet (run in progress or stopped)."
    return Table(f"Metrics: {run.label}", ["metric", "before", "after", "delta"], rows, note=note)


def _mark_best(rows: list[list[Any]], columns: dict[int, str]) -> set[tuple[int, int]]:
    best = set()
    for col, name in columns.items():
        values = [(r, _number(row[col])) for r, row in enumerate(rows)]
        values = [(r, v) for r, v in values if v is not None]
        if len(values) < 2:
            continue
        if len({v for _, v in values}) == 1:
            continue  # every run tied: nothing stands out
        pick = min if name in LOWER_IS_BETTER else max
        target = pick(v for _, v in values)
        best |= {(r, col) for r, v in values if v == target}
    return best


def comparison_table(runs: Sequence[Run]) -> Table:
    """Rows = runs, columns = metrics after training (then train seconds, peak memory);
    the best value of each column is marked (highest, or lowest for costs)."""
    metrics = _metric_names([r.evals.get("after") for r in runs])
    extra = ["train_seconds", "peak_memory_mb"]
    header = ["run", "method", *metrics, *extra]
    rows = []
    for run in runs:
        after = run.evals.get("after") or {}
        rows.append(
            [run.label, run.method]
            + [_number(after.get(m)) for m in metrics]
            + [_number(run.evals.get(k)) for k in extra]
        )
    columns = {i: name for i, name in enumerate(header) if i >= 2}
    note = (
        "Metrics after training; the best of each column is in bold (lowest for costs; "
        "none where every run ties)."
    )
    return Table("Metrics after training", header, rows, _mark_best(rows, columns), note)


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}."))
        elif _number(v) is not None:
            out[f"{prefix}{k}"] = float(v)
    return out


def baselines_table(runs: Sequence[Run]) -> Table | None:
    """``eval.json``'s ``baselines`` (scores without a model, e.g. chance accuracy), one
    row per run that has them; None when none has."""
    found = [
        (run.label, _flat_numbers(b))
        for run in runs
        if isinstance(b := run.evals.get("baselines"), dict) and _flat_numbers(b)
    ]
    if not found:
        return None
    names = _metric_names([values for _, values in found])
    rows = [[label, *(values.get(n) for n in names)] for label, values in found]
    note = "Scores without a trained model, from the evaluation data."
    return Table("Baselines", ["run", *names], rows, note=note)


def metrics_tables(runs: Sequence[Run]) -> list[Table]:
    """The tables of the report: runs, then metrics (one run: with deltas), baselines."""
    tables = [runs_table(runs)]
    tables.append(single_run_table(runs[0]) if len(runs) == 1 else comparison_table(runs))
    baselines = baselines_table(runs)
    if baselines is not None:
        tables.append(baselines)
    return tables


def to_markdown(table: Table) -> str:
    """A GitHub Markdown table (best cells in bold) under a ``###`` title."""

    def cell(r: int, c: int, value: Any) -> str:
        text = fmt(value).replace("|", "\\|")
        return f"**{text}**" if (r, c) in table.best else text

    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines.append("| " + " | ".join(table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    for r, row in enumerate(table.rows):
        lines.append("| " + " | ".join(cell(r, c, v) for c, v in enumerate(row)) + " |")
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """An HTML table (best cells with class ``best``) under an ``<h3>`` title."""
    parts = [f"<h3>{html.escape(table.title)}</h3>"]
    if table.note:
        parts.append(f"<p class='note'>{html.escape(table.note)}</p>")
    parts.append("<table><thead><tr>")
    parts += [f"<th>{html.escape(h)}</th>" for h in table.header]
    parts.append("</tr></thead><tbody>")
    for r, row in enumerate(table.rows):
        parts.append("<tr>")
        for c, value in enumerate(row):
            cls = " class='best'" if (r, c) in table.best else ""
            parts.append(f"<td{cls}>{html.escape(fmt(value))}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)
