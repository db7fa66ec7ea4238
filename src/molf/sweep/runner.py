"""Running a sweep: each cell is a ``molf train`` subprocess, one after another.

Group by group (model, task, method entry): the val cells of every lr point on the
selection seed, then the lr with the best val primary metric on every test seed. A
sweep that was stopped continues where it stopped: a finished cell (in the run dir or
in the summary) is skipped, an unfinished one with a checkpoint resumes from it, one
without restarts. Beside each run dir ``D`` the sweep keeps ``D.yaml`` (the cell's
settings, given to ``--config``), ``D.log`` (its output) and ``D.sweep.json``
(attempts, wall time, and the content hashes of the data and model it ran on).

Nothing is mixed silently: a summary row or run dir made with other settings, other
data or another model than the cell's now is refused (MolfError), one sweep at a time
holds the output dir (:class:`~molf.sweep.process.SweepLock`), and a cell's process
never outlives the sweep (:func:`~molf.sweep.process.run_child`).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.ownership import refuse_foreign, remove_owned
from molf.sweep.cells import check_inputs, check_run_dir, check_same, launch
from molf.sweep.estimate import estimate_text, reference, size_text
from molf.sweep.grid import Cell, Group, LrPoint, Sweep, all_possible_cells
from molf.sweep.outcomes import Outcome, cell_outcome, read_outcomes, write_outcomes
from molf.sweep.process import SweepLock
from molf.sweep.results import (
    INPUT_COLUMNS,
    Row,
    base_row,
    cell_row,
    choose_lr,
    fingerprint,
    input_hashes,
    read_summary,
    write_summary,
)
from molf.sweep.tables import results_markdown, selection_json
from molf.train.rundir import RunDir

OUTCOMES = "outcomes.jsonl"  # per-example results of the finished cells (molf.sweep.outcomes)

RESULT_FILES = ("results.md", "selection.json", "failed.json", OUTCOMES)  # beside summary.csv


@dataclass
class Runner:
    """Walks the grid in order; with ``execute`` False it only looks (``--dry-run``)."""

    sweep: Sweep
    execute: bool
    only: str | None = None
    rows: dict[str, Row] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)
    listing: list[tuple[str, str, str]] = field(default_factory=list)  # name, state, cost
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    matched: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0  # estimated wall time of the cells to run
    unknown: int = 0  # cells to run without an estimate

    def walk(self) -> None:
        for group in self.sweep.ordered_groups:
            for cell in self.sweep.stage1(group):
                self.visit(cell)
            chosen = self._choice(group)
            if chosen is None:
                for cell in self.sweep.stage2(group, group.points[0]):
                    name = f"{group.key}/lr?/test-s{cell.seed}"
                    cost = self.estimate(cell, _args(cell, self.sweep))
                    self.listing.append((name, "pending", f"{cost}; once the lr is chosen"))
                    if self.execute and any(
                        self.rows.get(c.name, {}).get("status") == "failed"
                        for c in self.sweep.stage1(self.sweep.chooser(group))
                    ):
                        self.blocked.append(name)
                continue
            self.choices[group.key] = chosen
            if self.execute and chosen[1]:
                self._write("selection.json", selection_json(self.sweep, self.choices))
            for cell in self.sweep.stage2(group, chosen[0]):
                self.visit(cell)

    def _choice(self, group: Group) -> tuple[LrPoint, list[dict]] | None:
        """The group's lr choice: from its own val cells, or the choice of the group it
        reuses (``select_with``, walked before it) with no val table of its own."""
        if group.select_with is None:
            return choose_lr(self.sweep, group, self.rows)
        source = self.choices.get(group.select_with)
        return None if source is None else (source[0], [])

    def _write(self, name: str, text: str) -> None:
        from molf.atomic import write_text_atomic

        self.sweep.results_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.sweep.results_dir / name, text)

    def write_results_md(self) -> None:
        """results.md from the rows, choices and outcomes walked so far."""
        md = results_markdown(self.sweep, self.rows, self.choices, self.outcomes)
        self._write("results.md", md)

    def _matches(self, name: str) -> bool:
        return self.only is None or name == self.only or fnmatch.fnmatchcase(name, self.only)

    def visit(self, cell: Cell) -> None:
        args = _args(cell, self.sweep)
        run_dir = Path(args.output_dir)
        expected = fingerprint(args.to_dict())
        inputs = input_hashes(args)
        if self._done_in_summary(cell, args, expected, inputs):
            self.keep_outcome(cell, run_dir)
            self.listing.append((cell.name, "done", ""))
            return
        record = check_run_dir(cell, args, expected, inputs)
        if RunDir(run_dir).complete:
            wall = record.get("wall_seconds")
            self.rows[cell.name] = cell_row(cell, args, run_dir, wall)
            self.keep_outcome(cell, run_dir)
            if self.execute:
                write_summary(self.sweep.summary, self.rows)
            self.listing.append((cell.name, "done", ""))
            return
        if RunDir(run_dir).checkpoints:
            state = "resume"
        elif run_dir.is_dir() and any(run_dir.iterdir()):
            state = "restart"
        else:
            state = "new"
        self.listing.append((cell.name, state, self.estimate(cell, args)))
        if self._matches(cell.name):
            self.matched += 1
            if self.execute:
                self.run_cell(cell, args, state)

    def keep_outcome(self, cell: Cell, run_dir: Path) -> None:
        """Copy a finished cell's per-example results into ``outcomes.jsonl`` (once; a
        run directory that is gone, or kept no predictions, adds nothing)."""
        if cell.name in self.outcomes or not RunDir(run_dir).complete:
            return
        outcome = cell_outcome(cell.name, run_dir, cell.group.primary_metric)
        if outcome is None:
            return
        self.outcomes[cell.name] = outcome
        if self.execute:
            self.sweep.results_dir.mkdir(parents=True, exist_ok=True)
            write_outcomes(self.sweep.results_dir / OUTCOMES, self.outcomes)

    def _done_in_summary(self, cell: Cell, args: Any, expected: str, inputs: Row) -> bool:
        """Whether the summary holds the cell's finished row, made as the cell is made now
        (else MolfError). A row from before the hash columns gets them (see
        ``results.INPUT_COLUMNS``), written with the summary's next rewrite."""
        row = self.rows.get(cell.name)
        if row is None or row.get("status") != "ok":
            return False
        where = f"its row in {self.sweep.summary}"
        check_same(cell, row.get("settings_hash"), expected, where)
        check_inputs(cell, args, row, inputs, where)
        filled = {k: inputs[k] for k in INPUT_COLUMNS if not row.get(k) and k in inputs}
        self.rows[cell.name] = {**row, **filled}
        return True

    def estimate(self, cell: Cell, args: Any) -> str:
        """The cell's size and, from a finished cell of the same model and task, its
        estimated seconds (:mod:`molf.sweep.estimate`); counted into :attr:`seconds`."""
        kinds = {g.task: g.settings.get("task", g.task) for g in self.sweep.groups}
        cells = {c.name: c for c in all_possible_cells(self.sweep)}

        def args_of(name: str) -> Any:
            return _args(cells[name], self.sweep) if name in cells else None

        rates = reference(cell, self.rows.values(), kinds.get, args_of)
        if rates is None:
            self.unknown += 1
            return size_text(args)
        text, wall = estimate_text(args, rates)
        self.seconds += wall
        return text

    def run_cell(self, cell: Cell, args: Any, state: str) -> None:
        """Run one cell (:func:`~molf.sweep.cells.launch`) and record its row, or its
        failure with the end of its log."""
        run_dir = Path(args.output_dir)
        code, wall, log_path = launch(self.sweep, cell, args, state)
        if code == 0 and RunDir(run_dir).complete:
            row = cell_row(cell, args, run_dir, wall)
            self.keep_outcome(cell, run_dir)
            metric = f"{cell.split}_{cell.group.primary_metric}"
            print(
                f"[sweep] {cell.name}: {metric}={row.get(metric, '?')} ({wall:.0f} s)", flush=True
            )
        else:
            row = base_row(cell, args, "failed")
            row.update(returncode=str(code), wall_seconds=str(round(wall, 2)))
            self.failed.append(cell.name)
            tail = log_path.read_text().strip().splitlines()[-3:]
            print(
                f"[sweep] {cell.name}: FAILED (exit {code}); see {log_path}:\n  "
                + "\n  ".join(tail),
                flush=True,
            )
        self.rows[cell.name] = row
        write_summary(self.sweep.summary, self.rows)


def _args(cell: Cell, sweep: Sweep) -> Any:
    from molf.train.args import resolve_args

    return resolve_args(None, cell.values(sweep.output_dir))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _print_listing(runner: Runner) -> None:
    width = max((len(n) for n, _, _ in runner.listing), default=0)
    for name, state, cost in runner.listing:
        print(f"{name:<{width}}  {state:<8}  {cost}".rstrip())
    todo = sum(1 for _, s, _ in runner.listing if s != "done")
    known = todo - runner.unknown
    print(
        f"[sweep] {len(runner.listing)} cells: {len(runner.listing) - todo} done, "
        f"{todo} to run"
        + (f", ~{_duration(runner.seconds)} for the {known} with an estimate" if known else "")
        + " (dry run: nothing was run)"
    )


def _report(runner: Runner) -> None:
    """Hand the finished test cells to ``molf.report`` when that module exists."""
    try:
        from molf.report import write_report
    except ImportError:
        return
    dirs, labels = [], []
    several = len({(g.model, g.task) for g in runner.sweep.groups}) > 1
    for group in runner.sweep.groups:
        if group.key in runner.choices:
            for cell in runner.sweep.stage2(group, runner.choices[group.key][0]):
                run_dir = runner.sweep.output_dir / cell.name
                if RunDir(run_dir).complete:
                    dirs.append(run_dir)
                    label = f"{group.key if several else group.method} s{cell.seed}"
                    labels.append(label)
    if dirs:
        write_report(dirs, runner.sweep.results_dir / "report", labels)


def run_sweep(
    sweep: Sweep, dry_run: bool = False, only: str | None = None, collect: bool = False
) -> int:
    """Run (or with ``dry_run`` list) the sweep; 0 when every cell finished, 1 when
    some failed. Stale results and an ``only`` that matches nothing raise MolfError
    before anything runs. ``collect`` runs nothing: it writes summary.csv, results.md
    and the report from the cells finished so far (e.g. by several sweeps, each with
    its own ``--only`` and ``--summary``). Except with ``dry_run``, the sweep holds
    :class:`~molf.sweep.process.SweepLock` on its output directory while it reads and
    rewrites the summary and runs cells: a second sweep there raises MolfError."""
    if not dry_run:
        _refuse_foreign_results(sweep)
    look = _look(sweep, only)  # checks every known cell against what is on disk and in the summary
    if dry_run:
        _print_listing(look)
        return 0
    if not collect:
        _check_only(look, only)
    with SweepLock(sweep.output_dir):
        _refuse_foreign_results(sweep)  # again: another sweep may have ended meanwhile
        if collect:
            return _collect(_look(sweep, only))
        return _execute(sweep, only)


def _refuse_foreign_results(sweep: Sweep) -> None:
    refuse_foreign(
        [sweep.summary, *(sweep.results_dir / n for n in RESULT_FILES)],
        "a sweep replaces only files it wrote: pass another --summary (its directory "
        "receives results.md, selection.json and failed.json)",
    )


def _look(sweep: Sweep, only: str | None) -> Runner:
    """Walk the grid without running anything (what --dry-run lists)."""
    look = Runner(sweep, execute=False, only=only, rows=read_summary(sweep.summary))
    look.outcomes = read_outcomes(sweep.results_dir / OUTCOMES)
    look.walk()
    return look


def _check_only(look: Runner, only: str | None) -> None:
    """Refuse an ``--only`` that matches no cell left to run nor a finished one."""
    finished = [n for n, s, _ in look.listing if s == "done" and look._matches(n)]
    if only is not None and not look.matched and not finished:
        todo = [n for n, s, _ in look.listing if s not in ("done",) and "?" not in n]
        raise MolfError(
            f"--only {only}: no cell left to run matches; cells to run: "
            + (", ".join(todo[:8]) or "none")
            + (" ..." if len(todo) > 8 else "")
        )


def _collect(look: Runner) -> int:
    """``--collect``: write summary.csv, outcomes.jsonl, results.md, selection.json and
    the report."""
    sweep = look.sweep
    write_summary(sweep.summary, look.rows)
    if look.outcomes:
        write_outcomes(sweep.results_dir / OUTCOMES, look.outcomes)
    look.write_results_md()
    look._write("selection.json", selection_json(sweep, look.choices))
    _report(look)
    print(f"[sweep] collected {len(look.rows)} finished cells into {sweep.summary}")
    return 0


def _execute(sweep: Sweep, only: str | None) -> int:
    """Run the cells left to run (under the sweep's lock), then write the results."""
    runner = Runner(sweep, execute=True, only=only, rows=read_summary(sweep.summary))
    runner.outcomes = read_outcomes(sweep.results_dir / OUTCOMES)
    runner.walk()
    write_summary(sweep.summary, runner.rows)
    runner.write_results_md()
    _report(runner)
    if runner.failed or runner.blocked:
        runner._write(
            "failed.json",
            json.dumps(
                {"failed": runner.failed, "not_run_lr_not_chosen": runner.blocked}, indent=2
            ),
        )
        print(
            f"[sweep] failed cells: {', '.join(runner.failed)}"
            + (
                f"; not run because their lr could not be chosen: {', '.join(runner.blocked)}"
                if runner.blocked
                else ""
            ),
            flush=True,
        )
        return 1
    remove_owned(sweep.results_dir / "failed.json")
    print(f"[sweep] done: {sweep.summary}, {sweep.results_dir / 'results.md'}", flush=True)
    return 0
