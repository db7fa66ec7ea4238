"""Names of routed modules: their type (``q_proj``, ``down_proj``, ...) and layer index.

Shared by the report and by the training loop's routing summary, so both group the
modules the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# The order of a decoder layer: attention projections, then the MLP.
TYPE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

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


def type_shares(counts: np.ndarray, modules: Sequence[str], steps: int) -> dict[str, np.ndarray]:
    """Per module type, the share of layer-steps in which each expert was selected.

    ``counts[m, e]`` is how many of ``steps`` steps expert ``e`` won module ``m``; the
    result maps each type to an array over experts (sums to top-k, or less if steps were
    skipped)."""
    out = {}
    for t, rows in group_modules(modules).items():
        out[t] = counts[rows].sum(0) / max(1, steps * len(rows))
    return out
