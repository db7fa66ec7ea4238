"""What a sweep is: a grid of groups (model x task x method entry, each with its
learning-rate points) whose cells are runs at one lr point, one seed, on one split.
Stage 1 runs a group's val cells to choose its lr; stage 2 its test cells at the chosen
lr, one per seed (:mod:`molf.sweep.config` reads these from the sweep file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


def format_lr(value: float) -> str:
    """A short, lossless, stable spelling of a learning rate: 1e-05, 3.5e-05, 0.0002 -> 2e-04."""
    mantissa, exponent = f"{value:.12e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


@dataclass(frozen=True)
class LrPoint:
    """One point of a method's learning-rate grid (``lora_lr`` None: the method's default)."""

    lr: float
    lora_lr: float | None = None

    @property
    def label(self) -> str:
        text = f"lr{format_lr(self.lr)}"
        return text if self.lora_lr is None else f"{text}-llr{format_lr(self.lora_lr)}"


@dataclass(frozen=True)
class Group:
    """A (model, task, method entry): its lr grid is searched on val, then run on test."""

    model: str  # the models section's name
    task: str  # the tasks section's name
    method: str  # the methods section's name (the "method label")
    settings: dict[str, Any]  # merged settings without lr, lora_lr, seed, eval_split
    points: tuple[LrPoint, ...]
    primary_metric: str  # the task's primary metric: what the lr choice maximises
    select_with: str | None = None  # the group (same model and method) whose choice it reuses

    @property
    def key(self) -> str:
        return f"{self.model}/{self.task}/{self.method}"

    @property
    def needs_selection(self) -> bool:
        """Whether the group runs val cells of its own to choose its lr."""
        return len(self.points) > 1 and self.select_with is None


@dataclass(frozen=True)
class Cell:
    """One run: a group at one lr point, one seed, evaluated on one split."""

    group: Group
    point: LrPoint
    seed: int
    split: str  # "val" (stage 1) or "test" (stage 2)

    @property
    def name(self) -> str:
        return f"{self.group.key}/{self.point.label}/{self.split}-s{self.seed}"

    def values(self, sweep_dir: Path) -> dict[str, Any]:
        """Every setting of this cell, as given to TrainArgs (None: the field's default).
        Val cells do not save their model: only their metric is needed."""
        return {
            **self.group.settings,
            **({"save_model": False} if self.split == "val" else {}),
            "lr": self.point.lr,
            "lora_lr": self.point.lora_lr,
            "seed": self.seed,
            "eval_split": self.split,
            "output_dir": str(sweep_dir / self.name),
        }


@dataclass(frozen=True)
class Sweep:
    """A loaded, validated sweep file."""

    path: Path
    output_dir: Path
    launcher: tuple[str, ...]  # the command that runs molf; train arguments follow it
    summary: Path
    groups: tuple[Group, ...]
    seeds: tuple[int, ...]
    select_seed: int

    @property
    def results_dir(self) -> Path:
        """Where summary.csv, selection.json, results.md (and failed.json) are kept."""
        return self.summary.parent

    @property
    def ordered_groups(self) -> list[Group]:
        """The groups in file order, those that reuse another group's choice last."""
        return sorted(self.groups, key=lambda g: g.select_with is not None)

    def chooser(self, group: Group) -> Group:
        """The group whose val cells choose ``group``'s lr: itself, or its ``select_with``."""
        if group.select_with is None:
            return group
        return next(g for g in self.groups if g.key == group.select_with)

    def stage1(self, group: Group) -> list[Cell]:
        """The val cells that choose the group's lr (none for a single-point grid)."""
        if not group.needs_selection:
            return []
        return [Cell(group, p, self.select_seed, "val") for p in group.points]

    def stage2(self, group: Group, point: LrPoint) -> list[Cell]:
        """The test cells of the group at its chosen lr, one per seed."""
        return [Cell(group, point, seed, "test") for seed in self.seeds]


def all_possible_cells(sweep: Sweep) -> list[Cell]:
    """Every cell the sweep could run: stage 1, and stage 2 at every lr point."""
    cells = []
    for g in sweep.groups:
        cells += sweep.stage1(g)
        for p in g.points:
            cells += sweep.stage2(g, p)
    return cells
