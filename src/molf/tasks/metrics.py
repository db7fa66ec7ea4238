"""Task-independent metric helpers (pure functions of scores and texts)."""

from __future__ import annotations

from collections.abc import Sequence


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; an empty sequence is a caller bug, not a zero score."""
    if not values:
        raise ValueError("mean of no values")
    return float(sum(values)) / len(values)


def share_preferred(first: Sequence[float], second: Sequence[float]) -> float:
    """Share of positions where ``first[i] > second[i]`` strictly (a tie is a failure)."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} scores against {len(second)}")
    return mean([float(a > b) for a, b in zip(first, second, strict=True)])


def text_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after stripping outer whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions against {len(references)} references")
    pairs = zip(predictions, references, strict=True)
    return mean([float(p.strip() == r.strip()) for p, r in pairs])
