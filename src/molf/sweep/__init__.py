"""``molf sweep CONFIG.yaml``: the study, a grid of ``molf train`` runs with a fair protocol.

Learning rates are chosen on the val split, final numbers come from the test split over
several seeds (see ``docs/protocol.md``). The CLI wires it with :func:`add_sweep_parser`
and :func:`run_sweep_command`; ``python -m molf.sweep CONFIG.yaml`` works on its own.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from molf.errors import MolfError
from molf.sweep.config import load_sweep
from molf.sweep.grid import Cell, Group, LrPoint, Sweep
from molf.sweep.runner import run_sweep

__all__ = [
    "Cell",
    "Group",
    "LrPoint",
    "Sweep",
    "add_sweep_parser",
    "load_sweep",
    "main",
    "run_sweep",
    "run_sweep_command",
]


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sweep`` command to the ``molf`` CLI's subparsers."""
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of train runs: lr chosen on val, results on test over seeds",
        description="Run every cell of CONFIG (models x tasks x methods x lrs x seeds) as a "
        "`molf train` run under its output_dir; rerun the same command to continue a "
        "stopped sweep. See docs/protocol.md.",
    )
    parser.add_argument("config", help="sweep YAML (see configs/study-cpu.yaml)")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the cells and their cost; run nothing"
    )
    parser.add_argument(
        "--only", metavar="CELL", help="run only the cells matching this name or glob"
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: write summary.csv and results.md from the finished cells",
    )
    parser.add_argument(
        "--summary",
        metavar="CSV",
        help="summary.csv to read (cells in it count as done) and rewrite "
        "(default: the YAML's summary, else OUTPUT_DIR/summary.csv)",
    )
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_sweep_command(ns: argparse.Namespace) -> int:
    """Run ``molf sweep`` from parsed arguments: 0 done, 1 some cells failed,
    2 bad configuration, stale results or another sweep holding the output dir (nothing
    was run), 130 interrupted (the running cell was stopped; rerun to continue)."""
    try:
        sweep = load_sweep(ns.config, ns.summary)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return run_sweep(sweep, dry_run=ns.dry_run, only=ns.only, collect=ns.collect)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except MolfError as e:
        print(f"molf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("molf: sweep interrupted; rerun the same command to continue", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """``python -m molf.sweep CONFIG [--dry-run] [--only CELL] [--summary CSV]``."""
    parser = argparse.ArgumentParser(prog="molf")
    add_sweep_parser(parser.add_subparsers(dest="command", required=True))
    args = sys.argv[1:] if argv is None else argv
    return run_sweep_command(parser.parse_args(["sweep", *args]))
