"""The report's figures, drawn with matplotlib's Agg backend into small PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molf.atomic import atomic_file
from molf.errors import MolfError
from molf.report.routing import bin_columns, first_expert_share, heatmap_rows, share_series
from molf.report.runs import Run, lr_keys, series
from molf.routing_log import NONE, SEVERAL, TIE, RoutingMatrix

DPI = 80
MAX_HEATMAP_COLUMNS = 400
EXPERT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
TYPE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
TYPE_MARKERS = ("o", "s", "^", "v", "D", "P", "X")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MolfError(
            "molf report draws with matplotlib: pip install 'molf[report]' (or matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    finally:
        _pyplot().close(fig)
    return path


def plot_training(runs: Sequence[Run], path: Path) -> Path:
    """Loss over steps (one line per run; dashed with circles: its ``eval_loss`` of
    ``--eval-steps``) above the learning rate(s) over steps."""
    plt = _pyplot()
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for run in runs:
        steps, loss = series(run, "loss")
        (line,) = ax_loss.plot(steps, loss, label=run.label, marker="." if len(steps) < 30 else "")
        eval_steps, eval_loss = series(run, "eval_loss")
        if eval_steps:
            ax_loss.plot(eval_steps, eval_loss, color=line.get_color(), linestyle="--",
                         marker="o", markersize=4, label=f"{run.label} eval")  # fmt: skip
        for i, key in enumerate(lr_keys(run)):
            lr_steps, lr = series(run, key)
            label = run.label if key == "lr" else f"{run.label} {key}"
            ax_lr.plot(lr_steps, lr, color=line.get_color(), label=label, linestyle="-:--"[i % 3])
    evaluated = len(ax_loss.get_lines()) > len(runs)
    ax_loss.set_ylabel("training and eval loss" if evaluated else "training loss")
    ax_loss.set_title("Training loss and learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    rates = [v for line in ax_lr.get_lines() for v in line.get_ydata() if v > 0]
    if rates and max(rates) > 5 * min(rates):  # e.g. a LoRA lr 10x the dense one: both visible
        ax_lr.set_yscale("log", nonpositive="mask")
    else:
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    if runs:
        ax_loss.legend(fontsize="small")
    if len(ax_lr.get_lines()) > len(runs):  # a LoRA lr beside the dense one: name them
        ax_lr.legend(fontsize="x-small")
    return _save(fig, path)


def plot_routing_heatmap(matrix: RoutingMatrix, title: str, path: Path) -> Path:
    """Modules x steps, coloured by the winning expert; modules grouped by type, ordered
    by layer within a type (long runs: each column is the most frequent winner of a bin)."""
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    order, groups = heatmap_rows(matrix)
    codes, width = bin_columns(matrix.winners[order], MAX_HEATMAP_COLUMNS)
    n_exp = len(matrix.experts)
    # colour index: experts 0..n-1, then "none", "several", "no decision"
    special = {NONE: n_exp, SEVERAL: n_exp + 1, TIE: n_exp + 2}
    index = codes.copy()
    for code, i in special.items():
        index[codes == code] = i
    colors = [EXPERT_COLORS[e % len(EXPERT_COLORS)] for e in range(n_exp)]
    colors += ["#ffffff", "#444444", "#bbbbbb"]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(len(colors) + 1) - 0.5, len(colors))
    height = min(12.0, max(3.0, 0.06 * len(order) + 1.5))
    fig, ax = plt.subplots(figsize=(8, height))
    steps = matrix.steps
    extent = (steps[0] - 0.5, steps[0] - 0.5 + width * codes.shape[1], len(order) - 0.5, -0.5)
    ax.imshow(index, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm, extent=extent)
    for _, start, _ in groups[1:]:
        ax.axhline(start - 0.5, color="black", linewidth=0.8)
    ax.set_yticks([(start + end - 1) / 2 for _, start, end in groups])
    ax.set_yticklabels([f"{t} ({end - start})" for t, start, end in groups])
    binned = f" (each column: {width} steps, most frequent winner)" if width > 1 else ""
    ax.set_xlabel(f"optimizer step{binned}")
    ax.set_ylabel("module type (layers top to bottom)")
    ax.set_title(f"Winning expert per module and step: {title}")
    shown = set(np.unique(index).tolist())
    labels = [*matrix.experts, "none (skipped)", "several", "no decision (all scores 0)"]
    handles = [Patch(color=colors[i], label=labels[i]) for i in range(len(colors)) if i in shown]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return _save(fig, path)


def _rolling(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start), NaN (a step
    without a decision) left out; NaN where the window holds no value."""
    known = ~np.isnan(values)
    if window <= 1:
        return values
    sums = np.concatenate([[0.0], np.cumsum(np.where(known, values, 0.0), dtype=float)])
    counts = np.concatenate([[0], np.cumsum(known)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    n = counts[ends] - counts[starts]
    return np.where(n > 0, (sums[ends] - sums[starts]) / np.maximum(n, 1), np.nan)


def plot_routing_shares(matrix: RoutingMatrix, title: str, path: Path) -> Path:
    """One panel per expert: the share of each module type's layers selecting it, over
    steps (a rolling mean over ~1/25 of the run when it is long)."""
    plt = _pyplot()
    shares = share_series(matrix)
    n_exp = len(matrix.experts)
    window = max(1, len(matrix.steps) // 25)
    fig, axes = plt.subplots(1, n_exp, figsize=(4 * n_exp, 3.2), sharey=True, squeeze=False)
    for e, ax in enumerate(axes[0]):
        for i, (t, share) in enumerate(shares.items()):
            color = TYPE_COLORS[i % len(TYPE_COLORS)]
            marker = TYPE_MARKERS[i % len(TYPE_MARKERS)]  # overlapping lines stay apart
            every = max(1, len(matrix.steps) // 8)
            values = _rolling(share[:, e], window)
            ax.plot(matrix.steps, values, label=t, color=color, marker=marker,
                    markevery=(i % every, every), markersize=4, linewidth=1.2)  # fmt: skip
        ax.set_title(f"{matrix.experts[e]} chosen")
        ax.set_xlabel("optimizer step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of layers")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    smooth = f", rolling mean of {window} steps" if window > 1 else ""
    fig.suptitle(f"Share of layers choosing each expert, per module type: {title}{smooth}")
    fig.tight_layout()
    return _save(fig, path)


def plot_routing_across_runs(routed: Sequence[tuple[str, RoutingMatrix]], path: Path) -> Path:
    """One line per routed run: the share of its layers choosing its first expert (molf's
    ``fft``), over the fraction of training done, so runs of different lengths (e.g.
    more or fewer training examples) line up; rolling mean over ~1/25 of each run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, matrix in routed:
        steps = matrix.steps.astype(float)
        window = max(1, len(steps) // 25)
        share = _rolling(first_expert_share(matrix), window)
        ax.plot(steps / max(steps[-1], 1.0), share, label=f"{label} ({matrix.experts[0]})",
                marker="." if len(steps) < 30 else "", linewidth=1.2)  # fmt: skip
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("share of layers")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.set_title("Share of layers choosing each run's first expert, over training")
    fig.tight_layout()
    return _save(fig, path)
