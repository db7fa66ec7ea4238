"""``write_report``: read runs, draw the figures, write ``index.html`` and ``summary.md``."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from molf.atomic import write_text_atomic
from molf.errors import MolfError
from molf.ownership import refuse_foreign
from molf.report.plots import (
    plot_routing_across_runs,
    plot_routing_heatmap,
    plot_routing_shares,
    plot_training,
)
from molf.report.runs import Run, load_run
from molf.report.tables import metrics_tables, to_html, to_markdown
from molf.routing_log import RoutingMatrix, routing_matrix
from molf.routing_stats import LoraExpert, RoutingSetup, collapse_warning

ACROSS_RUNS = "routing-across-runs.png"  # with two or more runs that choose (see choosing)
STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.best { font-weight: bold; background: #e6f4e6; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0 1em; }
.note { color: #555; }
.collapsed { background: #fff3cd; border: 1px solid #e0c36a; padding: 4px 8px; }
"""


@dataclass
class Figure:
    """A PNG of the report, relative to the output directory, with its caption."""

    file: str
    caption: str


def default_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or enough of its path to tell equal names apart."""
    paths = [Path(p).resolve() for p in run_dirs]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{p.name}#{i + 1}" for i, p in enumerate(paths)]


def _slugs(labels: Sequence[str]) -> list[str]:
    """File-name-safe, unique versions of the labels."""
    out: list[str] = []
    for label in labels:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "run"
        base, n = slug, 2
        while slug in out:
            slug, n = f"{base}-{n}", n + 1
        out.append(slug)
    return out


def _routed(runs: Sequence[Run]) -> list[tuple[Run, str, RoutingMatrix]]:
    """The runs with logged routing steps, each with its file-name slug and matrix."""
    out = []
    for run, slug in zip(runs, _slugs([r.label for r in runs])):
        if run.has_routing:
            matrix = routing_matrix(run.path)
            if len(matrix.steps):
                out.append((run, slug, matrix))
    return out


def report_files(routed: Sequence[tuple[Run, str, RoutingMatrix]]) -> list[str]:
    """The names the report writes into its output directory."""
    names = ["index.html", "summary.md", "training.png"]
    for _, slug, _ in routed:
        names += [f"routing-{slug}.png", f"shares-{slug}.png"]
    return names + ([ACROSS_RUNS] if len(choosing(routed)) > 1 else [])


def choosing(
    routed: Sequence[tuple[Run, str, RoutingMatrix]],
) -> list[tuple[Run, str, RoutingMatrix]]:
    """The routed runs whose optimizer chooses among their experts (top-k below their
    number); with top-k of every expert (MoLF-E's top-2 of 2) all are updated every
    step and the first expert's share is 1 throughout, so the figure across runs
    leaves them out."""
    return [r for r in routed if int(r[0].config.get("top_k") or 1) < len(r[2].experts)]


def draw_figures(
    runs: Sequence[Run], routed: Sequence[tuple[Run, str, RoutingMatrix]], out: Path
) -> list[Figure]:
    """Every figure of the report, written into ``out``."""
    figures = [Figure(plot_training(runs, out / "training.png").name, "Training loss and lr")]
    for run, slug, matrix in routed:
        heat = plot_routing_heatmap(matrix, run.label, out / f"routing-{slug}.png")
        shares = plot_routing_shares(matrix, run.label, out / f"shares-{slug}.png")
        figures.append(Figure(heat.name, f"{run.label} ({run.method}): winning expert"))
        figures.append(Figure(shares.name, f"{run.label} ({run.method}): routing shares"))
    across_runs = choosing(routed)
    if len(across_runs) > 1:
        pairs = [(run.label, matrix) for run, _, matrix in across_runs]
        across = plot_routing_across_runs(pairs, out / ACROSS_RUNS)
        figures.append(Figure(across.name, "Routing across runs: the first expert's share"))
    return figures


def collapse_notes(routed: Sequence[tuple[Run, str, RoutingMatrix]]) -> list[str]:
    """One "routing collapsed" line per run whose routing ended collapsed, with the cause
    and the fix (from the run's config.yaml)."""
    notes = []
    for run, _, matrix in routed:
        c = run.config
        steps = int(c.get("max_steps") or (run.last_step or 0))
        warmup = int(float(c.get("warmup_ratio") or 0) * steps)
        collapse = matrix.collapse(int(c.get("top_k") or 1), warmup)
        if collapse is None:
            continue
        lr = float(c.get("lr") or 0)
        lora = [
            LoraExpert(int(r), float(a), bool(c.get("use_rslora", True)))
            for r, a in zip(c.get("lora_ranks") or [], c.get("lora_alphas") or [])
        ]
        setup = RoutingSetup(
            lr,
            float(c.get("lora_lr") or lr),
            lora,
            has_fft="fft" in matrix.experts,  # molf's dense-weight expert; molf-e has none
            score=str(c.get("score") or "epd"),
        )
        text = collapse_warning(collapse, setup).removeprefix("warning: routing collapsed: ")
        notes.append(f"{run.label}: {text}")
    return notes


def render_html(
    title: str, runs: Sequence[Run], figures: Sequence[Figure], notes: Sequence[str] = ()
) -> str:
    """One self-contained page: tables inline, images by relative path."""
    badges = "".join(
        f"<p class='collapsed'><b>routing collapsed</b> {html.escape(n)}</p>\n" for n in notes
    )
    tables = badges + "\n".join(to_html(t) for t in metrics_tables(runs))
    images = "\n".join(
        f"<h3>{html.escape(f.caption)}</h3>\n"
        f"<img src='{html.escape(f.file)}' alt='{html.escape(f.caption)}'>"
        for f in figures
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{tables}\n<h2>Figures</h2>\n{images}\n"
        "</body></html>\n"
    )


def render_markdown(
    title: str, runs: Sequence[Run], figures: Sequence[Figure], notes: Sequence[str] = ()
) -> str:
    """The same tables in Markdown, with links to the figures."""
    parts = [f"# {title}", ""]
    parts += [f"> **routing collapsed** {n}\n" for n in notes]
    parts += [to_markdown(t) for t in metrics_tables(runs)]
    parts += ["## Figures", ""]
    parts += [f"![{f.caption}]({f.file})" for f in figures]
    return "\n".join(parts) + "\n"


def write_report(run_dirs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Report on one or more runs (finished or in progress) into ``out``; returns the path
    of ``out/index.html`` (``out/summary.md`` and the PNGs lie beside it)."""
    if not run_dirs:
        raise MolfError("molf report: give at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise MolfError(f"molf report: {len(labels)} labels for {len(run_dirs)} runs")
    labels = labels or default_labels(run_dirs)
    runs = [load_run(Path(d), label) for d, label in zip(run_dirs, labels)]
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise MolfError(f"molf report: --out {out} is a file; give a directory")
    routed = _routed(runs)
    refuse_foreign(
        [out / name for name in report_files(routed)],
        "molf report replaces only a report it wrote: pass another --out",
    )
    out.mkdir(parents=True, exist_ok=True)
    figures = draw_figures(runs, routed, out)
    title = f"molf report: {runs[0].label}" if len(runs) == 1 else f"molf report: {len(runs)} runs"
    notes = collapse_notes(routed)
    write_text_atomic(out / "summary.md", render_markdown(title, runs, figures, notes))
    index = out / "index.html"
    write_text_atomic(index, render_html(title, runs, figures, notes))
    return index
