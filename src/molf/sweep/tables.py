"""What a reader of a sweep sees: ``results.md`` and ``selection.json``.

results.md: per model and task, each method at its chosen lr on test (mean ± sample
std over seeds, and the primary metric's 95% bootstrap interval over examples, seeds
together); then, per model and task, each MoLF method (a routed one) minus the better
of the other methods on the same examples, with its paired interval read against -1.5
points (:mod:`molf.sweep.stats`), and FFT minus each PEFT adapter method, read against
0 (which of the two wins); then where the routed methods' optimizer routed
(each expert's share per module type, from the outcomes); then the val tables the lrs
were chosen from.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import TYPE_CHECKING, Any

from molf.sweep.grid import Group, LrPoint, Sweep, format_lr
from molf.sweep.outcomes import Outcome
from molf.sweep.results import Row, number
from molf.sweep.stats import MARGIN, Interval, method_interval, paired_difference

if TYPE_CHECKING:
    from molf.train.methods import TrainingMethod


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def _point_text(point: LrPoint) -> str:
    text = format_lr(point.lr)
    return text if point.lora_lr is None else f"{text} (lora {format_lr(point.lora_lr)})"


def _interval_text(interval: Interval | None) -> str:
    if interval is None:
        return ""
    return f"{interval.mean:.4f} [{interval.low:.4f}, {interval.high:.4f}]"


class _Pair:
    """One model and task: its groups, their finished test rows and outcomes."""

    def __init__(self, sweep: Sweep, groups: list[Group], rows, choices, outcomes) -> None:
        self.groups = groups
        self.chosen = {g.key: choices[g.key][0] for g in groups if g.key in choices}
        self.rows: dict[str, list[Row]] = {}
        self.outcomes: dict[str, list[Outcome]] = {}
        for g in groups:
            if g.key not in self.chosen:
                continue
            cells = sweep.stage2(g, self.chosen[g.key])
            done = [c for c in cells if rows.get(c.name, {}).get("status") == "ok"]
            self.rows[g.key] = [rows[c.name] for c in done]
            self.outcomes[g.key] = [outcomes[c.name] for c in done if c.name in outcomes]

    def pooled(self, group: Group) -> list[str] | None:
        """The group's outcome strings when every finished seed has one, all of the same
        examples."""
        found = self.outcomes.get(group.key, [])
        if not found or len(found) != len(self.rows[group.key]):
            return None
        if len({o["prompts"] for o in found}) != 1:
            return None
        return [o["correct"] for o in found]

    def comparable(self) -> bool:
        """Whether every group with outcomes scored the same examples in one order."""
        prompts = {o["prompts"] for found in self.outcomes.values() for o in found}
        return len(prompts) == 1

    def metrics(self) -> list[str]:
        """The test metric columns, the primary one first."""
        found = sorted(
            {
                k
                for rs in self.rows.values()
                for r in rs
                for k in r
                if k.startswith("test_") and not k.endswith("_before") and r[k]
            }
        )
        primary = f"test_{self.groups[0].primary_metric}"
        return ([primary] if primary in found else []) + [m for m in found if m != primary]


def _method_rows(sweep: Sweep, pair: _Pair, metrics: list[str]) -> list[str]:
    lines = []
    for g in pair.groups:
        if g.key not in pair.chosen:
            lines.append(f"| {g.method} | pending | 0 |" + " |" * (len(metrics) + 1) + " |")
            continue
        rs = pair.rows[g.key]
        cols = [_mean_std([number(r.get(m)) for r in rs if r.get(m)]) for m in metrics]
        outcomes = pair.pooled(g)
        cols.append(_interval_text(method_interval(outcomes) if outcomes else None))
        train = [number(r.get("train_seconds")) for r in rs]
        chosen = _point_text(pair.chosen[g.key])
        if g.select_with:
            chosen += f" (chosen on {sweep.chooser(g).task})"
        lines.append(
            f"| {g.method} | {chosen} | {len(rs)} | "
            + " | ".join(cols)
            + (f" | {statistics.fmean(train):.1f} |" if train else " | |")
        )
    return lines


def _paired_groups(pair: _Pair) -> tuple[dict[str, list[str]], list[Group]] | None:
    """Each finished group's pooled outcomes, and the groups; None when the groups did
    not score the same examples in one order (nothing can be paired)."""
    if not pair.comparable():
        return None
    pooled = {g.key: pair.pooled(g) for g in pair.groups if pair.rows.get(g.key)}
    return pooled, [g for g in pair.groups if g.key in pooled]


def _difference_lines(pair: _Pair) -> list[str]:
    """Each routed (MoLF) group minus the best other group on test, paired by example;
    only when every one of them has the outcomes of all its finished seeds."""
    found = _paired_groups(pair)
    if found is None:
        return []
    pooled, groups = found
    routed = [g for g in groups if _routed(g)]
    others = [g for g in groups if not _routed(g)]
    if not routed or not others:
        return []
    if not all(pooled[g.key] for g in [*routed, *others]):
        return ["- not yet: some of these methods' test cells ran before outcomes were kept"]
    best = max(others, key=lambda g: method_interval(pooled[g.key]).mean)
    lines = []
    for g in routed:
        diff = paired_difference(pooled[g.key], pooled[best.key])
        lines.append(f"- {g.method} − {best.method}: {diff.points()} points; {_reading(diff)}")
    return lines


def _fft_lines(pair: _Pair) -> list[str]:
    """The paper's other question, which of FFT and LoRA wins: each FFT group minus each
    adapter group (LoRA, DoRA, AdaLoRA; not routed), paired by example, read against 0."""
    found = _paired_groups(pair)
    if found is None:
        return []
    pooled, groups = found
    dense = [g for g in groups if _kind(g).trains_base and not _kind(g).routed and pooled[g.key]]
    adapters = [g for g in groups if _kind(g).peft and pooled[g.key]]
    lines = []
    for a in dense:
        for b in adapters:
            diff = paired_difference(pooled[a.key], pooled[b.key])
            lines.append(
                f"- {a.method} − {b.method}: {diff.points()} points; {_reading(diff, 0.0)}"
            )
    return lines


def _kind(group: Group) -> TrainingMethod:
    from molf.train.methods import METHODS

    return METHODS[group.settings["method"]]


def _routed(group: Group) -> bool:
    return _kind(group).routed


def _reading(diff: Interval, margin: float = MARGIN) -> str:
    """How the interval of a difference reads against ``margin`` (a share)."""
    where = diff.verdict(margin)
    line = f"{100 * margin:+.1f} points" if margin else "0"
    return (
        f"the interval straddles {line}"
        if where == "straddles"
        else f"the interval lies {where} {line}"
    )


def _val_lines(sweep: Sweep, choices: dict[str, Any]) -> list[str]:
    lines = []
    for g in sweep.groups:
        if g.key in choices and choices[g.key][1]:
            _, table = choices[g.key]
            column = f"val_{g.primary_metric}"
            cells = ", ".join(
                f"{_point_text(LrPoint(e['lr'], e['lora_lr']))}: {e[column]:.4f}"
                + (f" (chosen: {e['chosen_by']})" if "chosen_by" in e else "")
                for e in table
            )
            lines.append(f"- {g.key}, {column}: {cells}")
    return ["", "## Learning-rate choice (val)", "", *lines] if lines else []


def results_markdown(
    sweep: Sweep,
    rows: dict[str, Row],
    choices: dict[str, Any],
    outcomes: dict[str, Outcome] | None = None,
) -> str:
    """results.md (see the module docstring); ``outcomes``: per cell, its per-example
    results (``outcomes.jsonl``), for the intervals."""
    lines = [
        f"# Sweep results ({sweep.path.name})",
        "",
        "Test split; mean ± sample standard deviation over seeds (n = finished seeds), and "
        "the primary metric's 95% bootstrap interval over examples (an example's seeds "
        "together; the trained models are held fixed, so the interval leaves out how "
        "training itself varies from seed to seed); each method's lr was chosen on the val "
        f"split (seed {sweep.select_seed}; `selection.json`), never on test; the best other "
        "method of a difference is the one best on test.",
    ]
    by_pair: dict[tuple[str, str], list[Group]] = {}
    for g in sweep.groups:
        by_pair.setdefault((g.model, g.task), []).append(g)
    for (model, task), groups in by_pair.items():
        pair = _Pair(sweep, groups, rows, choices, outcomes or {})
        metrics = pair.metrics()
        header = ["method", "lr (chosen on val)", "n", *metrics, "95% CI", "train s"]
        lines += [
            "",
            f"## {model} / {task}",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *_method_rows(sweep, pair, metrics),
        ]
        differences = _difference_lines(pair)
        if differences:
            lines += ["", "MoLF minus the best other method, paired by example (95% CI):"]
            lines += ["", *differences]
        fft_differences = _fft_lines(pair)
        if fft_differences:
            lines += ["", "FFT minus each adapter method, paired by example (95% CI):"]
            lines += ["", *fft_differences]
        lines += _routing_lines(pair)
    return "\n".join(lines + _val_lines(sweep, choices)) + "\n"


def _routing_lines(pair: _Pair) -> list[str]:
    """Per routed group with routing in its outcomes: each expert's share of the decided
    layer-steps, overall and per module type, mean over its seeds."""
    table: list[tuple[str, str, int, float, dict[str, float]]] = []
    types: list[str] = []
    for g in pair.groups:
        found = [o["routing"] for o in pair.outcomes.get(g.key, []) if "routing" in o]
        if not found:
            continue
        for e, expert in enumerate(found[0]["experts"]):
            by_type = {
                t: statistics.fmean(r["by_type"][t][e] for r in found if t in r["by_type"])
                for t in found[0]["by_type"]
            }
            types += [t for t in by_type if t not in types]
            overall = statistics.fmean(r["all"][e] for r in found)
            table.append((g.method, expert, len(found), overall, by_type))
    if not table:
        return []
    lines = [
        "",
        "Routing: each expert's share of the decided layer-steps (test cells, mean over seeds):",
        "",
        "| method | expert | n | all | " + " | ".join(types) + " |",
        "|" + "---|" * (len(types) + 4),
    ]
    for method, expert, n, overall, by_type in table:
        cells = [f"{by_type[t]:.3f}" if t in by_type else "" for t in types]
        lines.append(f"| {method} | {expert} | {n} | {overall:.3f} | " + " | ".join(cells) + " |")
    return lines


def selection_json(sweep: Sweep, choices: dict[str, Any]) -> str:
    """``selection.json``: each group's chosen lr point and the val table behind it (a
    group that reuses another's choice names that group instead)."""
    reused = {g.key: g.select_with for g in sweep.groups if g.select_with}
    out = {}
    for key, (point, table) in choices.items():
        if key in reused:
            note = f"the lr chosen on val for {reused[key]}"
        elif table:
            note = "best val primary metric; ties: its margin when recorded, then the smaller lr"
        else:
            note = "single lr point: nothing to choose"
        out[key] = {
            "lr": point.lr,
            "lora_lr": point.lora_lr,
            "label": point.label,
            "val": [
                {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in e.items()}
                for e in table
            ],
            "note": note,
            "chosen_by": next((e["chosen_by"] for e in table if "chosen_by" in e), None),
        }
    return json.dumps(out, indent=2)
