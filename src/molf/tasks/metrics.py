"""Task-independent metric helpers (pure functions of scores and texts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


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
    return mean([float(text_matches(p, r)) for p, r in pairs])


def text_matches(prediction: str, reference: str) -> bool:
    """Whether the two texts are equal after stripping outer whitespace."""
    return prediction.strip() == reference.strip()


def majority_share(labels: Sequence[Hashable]) -> float:
    """Share of the most frequent label: the accuracy of always giving that one answer."""
    if not labels:
        raise ValueError("majority share of no labels")
    return max(Counter(labels).values()) / len(labels)


def choice_margin(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """The mean over questions of the correct option's score minus the best other
    option's score (positive when the question is answered right)."""
    return mean(
        [
            row[a] - max(v for i, v in enumerate(row) if i != a)
            for row, a in zip(scores, answers, strict=True)
        ]
    )
