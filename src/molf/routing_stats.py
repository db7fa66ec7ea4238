"""Routing statistics: how often each expert won each module, and when routing collapsed.

One place for what training logs, the Trainer callback, the model card and the report
count from the optimizer's routing decisions (:class:`molf.optim.Routing`).

**Ties are not decisions.** A module whose scores are all 0 (the lr is 0, as on the
first step of a warm-up, or the module got no gradient) compared nothing: the optimizer
still selects by its tie rule (exactly the authors' top-k), but the statistics leave
that module-step out of every share and the report draws it as "no decision".

**Collapse.** Routing has collapsed when one expert won at least
:data:`COLLAPSE_SHARE` of the decided layer-steps over the last window after the
warm-up (window: the larger of :data:`MIN_WINDOW` steps and 10% of the steps so far).
EPD's score carries each expert's learning rate and, for a LoRA expert, its scale
``s = alpha/sqrt(r)``, so a LoRA lr 10x the dense one, or two LoRA experts of unequal
scale, decide the routing by themselves; :func:`collapse_warning` says so and names
the settings to change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# The order of a decoder layer: attention projections, then the MLP.
TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COLLAPSE_SHARE = 0.99
MIN_WINDOW = 10
SUMMARY_MIN_SHARE = 0.10  # module types below this share are folded into "others"
SUMMARY_MAX_TYPES = 4  # and so are those past the first four

_INDEX = re.compile(r"^\d+$")


def module_type(name: str) -> str:
    """The last component of a module name: ``model.layers.3.mlp.up_proj`` -> ``up_proj``."""
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int | None:
    """The first numeric component of a module name (its layer), or None if it has none."""
    for part in name.split("."):
        if _INDEX.match(part):
            return int(part)
    return None


def module_types(modules: Sequence[str]) -> list[str]:
    """The distinct module types, known ones in decoder order, others in order of appearance."""
    seen = list(dict.fromkeys(module_type(m) for m in modules))
    known = [t for t in TYPE_ORDER if t in seen]
    return known + [t for t in seen if t not in TYPE_ORDER]


def group_modules(modules: Sequence[str]) -> dict[str, list[int]]:
    """Row indices of ``modules`` per type (types in :func:`module_types` order), each
    list sorted by layer index (modules without one last, by name)."""

    def key(i: int) -> tuple[int, int, str]:
        layer = layer_index(modules[i])
        return (0 if layer is not None else 1, layer or 0, modules[i])

    groups: dict[str, list[int]] = {t: [] for t in module_types(modules)}
    for i, name in enumerate(modules):
        groups[module_type(name)].append(i)
    return {t: sorted(rows, key=key) for t, rows in groups.items()}


def decided(scores: np.ndarray) -> np.ndarray:
    """bool ``scores.shape[:-1]``: whether each module-step compared anything (not every
    score 0). NaN scores (not logged) count as decided."""
    return ~(scores == 0).all(-1)


@dataclass
class RoutingCounts:
    """Wins per module and expert over decided module-steps; ties counted apart.

    ``counts[m, e]``: steps in which expert ``e`` won module ``m`` by a decision;
    ``decisions[m]``: module ``m``'s decided steps; shares are their ratios (summing to
    top-k over the experts)."""

    modules: list[str]
    experts: list[str]
    counts: np.ndarray = field(init=False)  # int [modules, experts]
    decisions: np.ndarray = field(init=False)  # int [modules]
    ties: int = 0
    steps: int = 0
    first_step: int = 0
    last_step: int = 0

    def __post_init__(self) -> None:
        self.counts = np.zeros((len(self.modules), len(self.experts)), dtype=np.int64)
        self.decisions = np.zeros(len(self.modules), dtype=np.int64)

    def add(self, step: int, selected: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Count one step (``selected`` bool and ``scores`` float, both [modules,
        experts]); returns this step's decided-module mask."""
        made = decided(scores)
        self.counts += selected.astype(np.int64) * made[:, None]
        self.decisions += made
        self.ties += int((~made).sum())
        self.first_step = step if not self.steps else self.first_step
        self.steps += 1
        self.last_step = step
        return made

    def expert_shares(self) -> np.ndarray:
        """float [experts]: each expert's share of the decided layer-steps."""
        return self.counts.sum(0) / max(1, int(self.decisions.sum()))

    def type_shares(self) -> dict[str, np.ndarray]:
        """Per module type, float [experts]: the shares within that type."""
        out = {}
        for t, rows in group_modules(self.modules).items():
            out[t] = self.counts[rows].sum(0) / max(1, int(self.decisions[rows].sum()))
        return out

    def scalars(self) -> dict[str, float]:
        """Tracker scalars: ``routing/<expert>``, ``routing/<type>/<expert>`` shares and
        ``routing/ties`` (the share of module-steps that made no decision)."""
        if not self.steps:
            return {}
        out = {f"routing/{e}": float(v) for e, v in zip(self.experts, self.expert_shares())}
        for t, shares in self.type_shares().items():
            out.update({f"routing/{t}/{e}": float(v) for e, v in zip(self.experts, shares)})
        out["routing/ties"] = self.ties / max(1, self.steps * len(self.modules))
        return out

    def summary(self) -> str:
        """One line, e.g. ``routing, steps 1-60: lora0 88%, fft 12% of layer-steps;
        fft: down_proj 41%, k_proj 30%, others < 10%``: every expert but the most chosen
        one, with the module types where it is chosen most (ties left out, and counted
        at the end when there were any)."""
        if not self.steps:
            return "routing: no steps yet"
        steps = (
            f"step {self.last_step}"
            if self.first_step == self.last_step
            else f"steps {self.first_step}-{self.last_step}"
        )
        ties = f"; {self.ties} module-steps without a decision (all scores 0)" if self.ties else ""
        if not self.decisions.sum():
            return f"routing, {steps}: no decision yet (all scores 0: lr 0 in the warm-up){ties}"
        overall, by_type = self.expert_shares(), self.type_shares()
        ranked = sorted(range(len(self.experts)), key=lambda e: -overall[e])
        total = ", ".join(f"{self.experts[e]} {overall[e]:.0%}" for e in ranked)
        clauses = [f"{self.experts[e]}: {_where(by_type, e)}" for e in ranked[1:]]
        return (
            f"routing, {steps}: {total} of layer-steps" + "".join(f"; {c}" for c in clauses) + ties
        )


def _where(by_type: dict[str, np.ndarray], e: int) -> str:
    where = sorted(((v[e], t) for t, v in by_type.items()), key=lambda x: -x[0])
    shown = [(v, t) for v, t in where if v >= SUMMARY_MIN_SHARE][:SUMMARY_MAX_TYPES]
    big = [f"{t} {v:.0%}" for v, t in shown]
    if len(shown) < len(where):
        rest, floor = where[len(shown)][0], SUMMARY_MIN_SHARE
        bound = f"<= {rest:.0%}" if rest >= floor else f"< {floor:.0%}"
        big.append(f"{'others' if big else 'all'} {bound}")
    return ", ".join(big)


def moved(before: np.ndarray | None, now: np.ndarray, points: float = 0.01) -> bool:
    """Whether any share moved by more than ``points`` (always, with nothing before)."""
    return before is None or bool(np.abs(now - before).max() > points)


@dataclass
class Collapse:
    """One expert won (nearly) every decided layer-step since ``since``."""

    expert: str
    since: int
    share: float


class CollapseWatch:
    """Watches each step's shares after the warm-up and reports a collapse once.

    ``add`` returns a :class:`Collapse` the first time one expert has won at least
    ``threshold`` of the decided layer-steps over the last window (the larger of
    :data:`MIN_WINDOW` steps and 10% of the steps so far); it re-arms when routing
    changes (the share drops below the threshold). With ``top_k`` >= the number of
    experts every expert is updated every step, so nothing can collapse."""

    def __init__(
        self, experts: Sequence[str], top_k: int, warmup_steps: int = 0, threshold: float = 0.99
    ) -> None:
        self.experts, self.warmup_steps, self.threshold = list(experts), warmup_steps, threshold
        self.active = top_k < len(self.experts)
        self.history: list[tuple[int, np.ndarray, int]] = []  # step, wins [E], decisions
        self.warned: str | None = None
        self.steps = 0

    def add(self, step: int, wins: np.ndarray, decisions: int) -> Collapse | None:
        """Count one step: ``wins`` int [experts] over its decided modules."""
        self.steps = max(self.steps, step)
        if not self.active or step <= self.warmup_steps or not decisions:
            return None
        self.history.append((step, np.asarray(wins), int(decisions)))
        found = self.current()
        if found is None:
            self.warned = None  # routing moved: warn again if it collapses again
            return None
        if found.expert == self.warned:
            return None
        self.warned = found.expert
        return found

    def current(self) -> Collapse | None:
        """The collapse over the last window, if routing has collapsed now."""
        window = max(MIN_WINDOW, math.ceil(0.1 * self.steps))
        if len(self.history) < window:
            return None
        recent = self.history[-window:]
        wins = sum(w for _, w, _ in recent)
        shares = wins / sum(d for _, _, d in recent)
        e = int(np.argmax(shares))
        if shares[e] < self.threshold:
            return None
        since = recent[0][0]
        for step, w, d in reversed(self.history[:-window]):
            if w[e] / d < self.threshold:
                break
            since = step
        return Collapse(self.experts[e], since, float(shares[e]))


@dataclass
class LoraExpert:
    """A LoRA expert's shape: its rank, alpha and scale ``s`` (``alpha/sqrt(r)`` with
    rsLoRA, else ``alpha/r``)."""

    rank: int
    alpha: float
    rslora: bool = True

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def formula(self) -> str:
        root = f"sqrt({self.rank})" if self.rslora else str(self.rank)
        return f"{self.alpha:g}/{root} = {self.scale:.2f}"


@dataclass
class RoutingSetup:
    """What decides EPD's routing besides the gradients, for :func:`collapse_warning`.
    ``library`` names the settings as keyword arguments (``lora_lr=``) instead of
    ``molf train``'s flags (``--lora-lr``)."""

    lr: float
    lora_lr: float
    lora: list[LoraExpert]
    has_fft: bool = True
    library: bool = False
    score: str = "epd"

    def name(self, setting: str) -> str:
        return f"{setting}=" if self.library else "--" + setting.replace("_", "-")


def collapse_warning(c: Collapse, setup: RoutingSetup) -> str:
    """The one-line warning for a collapse: what happened, the cause and the fix."""
    head = (
        f"warning: routing collapsed: {c.expert} won {c.share:.0%} of layer-steps since "
        f"step {c.since}; "
    )
    lr, lora_lr = setup.name("lr"), setup.name("lora_lr")
    if setup.score == "pfn":  # neither the rates nor the scales enter PFN's score
        score = "score='epd'" if setup.library else "--score epd"
        return head + (
            "PFN compares how consistent each expert's Adam direction is, whatever its "
            f"learning rate or scale, and that decided alone. {score} (the default) with "
            f"equal rates ({lora_lr} = {lr}) lets the rates and scales be tuned; "
            "see docs/tuning.md"
        )
    if not setup.has_fft:  # MoLF-E: the experts share one lr; their scales decide
        scales = ", ".join(
            f"lora{i} (rank {x.rank}) {x.formula()}" for i, x in enumerate(setup.lora)
        )
        return (
            head + f"EPD scales each LoRA expert's score with its scale alpha/sqrt(r): "
            f"{scales}; MoLF-E is training as one rank. Equal scales let both ranks compete "
            f"(alpha proportional to sqrt(r), via {setup.name('lora_alphas')}); "
            "see docs/tuning.md"
        )
    ratio = setup.lora_lr / setup.lr if setup.lr else math.inf
    as_what = "LoRA" if c.expert != "fft" else "full fine-tuning"
    if abs(ratio - 1) > 1e-9:
        cause = (
            f"EPD scales each expert's score by its learning rate and {lora_lr} "
            f"({setup.lora_lr:g}) is {ratio:.3g}x {lr} ({setup.lr:g})"
        )
        fix = f"The authors' recipe uses equal rates ({lora_lr} = {lr})"
    else:
        scales = ", ".join(x.formula() for x in setup.lora)
        cause = (
            f"{lora_lr} equals {lr} ({setup.lr:g}), so the gradients and the LoRA scale "
            f"alpha/sqrt(r) ({scales}) decided"
        )
        fix = "A smaller LoRA scale or --score pfn (scale-invariant) gives FFT more layers"
        fix = fix if not setup.library else fix.replace("--score pfn", "score='pfn'")
    return head + f"{cause}; MoLF is training as {as_what}. {fix}; see docs/tuning.md"
