"""``routing.jsonl`` read back: every logged routing decision of a run as a
:class:`RoutingMatrix` (written step by step by :class:`molf.train.logs.RunLogger`; read
by the model card and ``molf report``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from molf.errors import MolfError
from molf.jsonl import by_step, read_jsonl
from molf.routing_stats import Collapse, CollapseWatch, RoutingCounts, decided

# heatmap codes: no expert selected (skipped step), several (top-k > 1), no decision (tie)
NONE, SEVERAL, TIE = -1, -2, -3


@dataclass
class RoutingMatrix:
    """Every logged routing decision of a run, modules in ``routing.jsonl`` order.

    ``selected[m, s, e]`` is True when expert ``e`` was among the winners of module
    ``m`` at ``steps[s]``; ``scores[m, s, e]`` is its logged score."""

    modules: list[str]
    experts: list[str]
    steps: np.ndarray  # int [steps]
    selected: np.ndarray  # bool [modules, steps, experts]
    scores: np.ndarray  # float [modules, steps, experts]

    @property
    def decided(self) -> np.ndarray:
        """bool [modules, steps]: the module-steps that compared something (not every
        score 0; see :mod:`molf.routing_stats`)."""
        return decided(self.scores)

    @property
    def winners(self) -> np.ndarray:
        """int [modules, steps]: the single winning expert's index, ``NONE`` when nothing
        was selected, ``SEVERAL`` when more than one expert was (top-k > 1), ``TIE`` when
        the module made no decision (all scores 0)."""
        count = self.selected.sum(-1)
        out = self.selected.argmax(-1).astype(np.int64)
        out[count == 0] = NONE
        out[count > 1] = SEVERAL
        out[~self.decided] = TIE
        return out

    def counts(self) -> RoutingCounts:
        """The whole run's :class:`RoutingCounts` (ties left out of the shares)."""
        counts = RoutingCounts(self.modules, self.experts)
        for s, step in enumerate(self.steps):
            counts.add(int(step), self.selected[:, s], self.scores[:, s])
        return counts

    def collapse(self, top_k: int, warmup_steps: int) -> Collapse | None:
        """The collapse the run ended in (see :class:`CollapseWatch`), or None."""
        watch = CollapseWatch(self.experts, top_k, warmup_steps)
        made = self.decided
        for s, step in enumerate(self.steps):
            wins = (self.selected[:, s] & made[:, s, None]).sum(0)
            watch.add(int(step), wins, int(made[:, s].sum()))
        return watch.current()


def _header(path: Path, records: list) -> tuple[list[str], list[str]]:
    heads = [(line, r) for line, r in records if "modules" in r]
    if not heads:
        raise MolfError(f"{path}:1: no header line with 'modules' and 'experts'")
    line, head = heads[0]
    modules, experts = head.get("modules"), head.get("experts")
    if not (isinstance(modules, list) and isinstance(experts, list) and experts):
        raise MolfError(f"{path}:{line}: the header needs lists 'modules' and 'experts'")
    for other_line, other in heads[1:]:
        if other.get("modules") != modules or other.get("experts") != experts:
            raise MolfError(f"{path}:{other_line}: a second header with other modules or experts")
    return [str(m) for m in modules], [str(e) for e in experts]


def routing_matrix(run_dir: Path) -> RoutingMatrix:
    """Read ``run_dir/routing.jsonl`` (a repeated step keeps its last line)."""
    path = Path(run_dir) / "routing.jsonl"
    if not path.is_file():
        raise MolfError(f"{path}: no such file (only molf and molf-e runs log routing)")
    records = read_jsonl(path)
    modules, experts = _header(path, records)
    steps = by_step(path, [(line, r) for line, r in records if "modules" not in r])
    n_mod, n_exp = len(modules), len(experts)
    selected = np.zeros((n_mod, len(steps), n_exp), dtype=bool)
    scores = np.full((n_mod, len(steps), n_exp), np.nan)
    for s, (line, rec) in enumerate(steps.values()):
        where = f"{path}:{line}"
        winners, row_scores = rec.get("winners"), rec.get("scores")
        if not isinstance(winners, list) or len(winners) != n_mod:
            raise MolfError(f"{where}: 'winners' must list {n_mod} modules' winners")
        for m, won in enumerate(winners):
            if not isinstance(won, list) or not all(
                isinstance(e, int) and 0 <= e < n_exp for e in won
            ):
                raise MolfError(f"{where}: winners of module {m} must be expert indices < {n_exp}")
            selected[m, s, won] = True
        if row_scores is not None:
            try:
                scores[:, s] = np.asarray(row_scores, dtype=float).reshape(n_mod, n_exp)
            except (TypeError, ValueError):
                raise MolfError(f"{where}: 'scores' must be {n_mod} x {n_exp} numbers") from None
    return RoutingMatrix(modules, experts, np.array(list(steps), dtype=np.int64), selected, scores)
