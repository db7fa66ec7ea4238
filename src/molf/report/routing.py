"""The data behind the routing figures, from a run's :class:`~molf.routing_log.RoutingMatrix`."""

from __future__ import annotations

import numpy as np

from molf.routing_log import RoutingMatrix
from molf.routing_stats import group_modules


def heatmap_rows(matrix: RoutingMatrix) -> tuple[list[int], list[tuple[str, int, int]]]:
    """Row order of the heatmap (grouped by module type, by layer within a type) and the
    groups as ``(type, first row, end row)`` in that order."""
    order, groups = [], []
    for t, rows in group_modules(matrix.modules).items():
        groups.append((t, len(order), len(order) + len(rows)))
        order.extend(rows)
    return order, groups


def share_series(matrix: RoutingMatrix) -> dict[str, np.ndarray]:
    """Per module type, float [steps, experts]: the share of that type's decided layers
    that selected each expert at each step (NaN where none of them decided)."""
    out = {}
    made = matrix.decided
    for t, rows in group_modules(matrix.modules).items():
        wins = (matrix.selected[rows] & made[rows, :, None]).sum(0)
        n = made[rows].sum(0)[:, None]
        out[t] = np.where(n > 0, wins / np.maximum(n, 1), np.nan)
    return out


def first_expert_share(matrix: RoutingMatrix) -> np.ndarray:
    """float [steps]: the share of all decided layers that selected expert 0 (molf's
    ``fft``, molf-e's first LoRA) at each step; NaN where no layer decided."""
    made = matrix.decided
    wins = (matrix.selected[:, :, 0] & made).sum(0)
    n = made.sum(0)
    return np.where(n > 0, wins / np.maximum(n, 1), np.nan)


def bin_columns(codes: np.ndarray, max_columns: int) -> tuple[np.ndarray, int]:
    """Shrink int ``[rows, steps]`` codes to at most ``max_columns`` columns, each the most
    frequent code over its run of consecutive steps; returns the codes and steps per column."""
    n = codes.shape[1]
    width = max(1, -(-n // max_columns))
    if width == 1:
        return codes, 1
    out = np.empty((codes.shape[0], -(-n // width)), dtype=codes.dtype)
    for c in range(out.shape[1]):
        block = codes[:, c * width : (c + 1) * width]
        values = np.unique(block)
        counts = np.stack([(block == v).sum(1) for v in values], 1)
        out[:, c] = values[counts.argmax(1)]
    return out, width
