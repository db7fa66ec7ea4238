"""Confidence intervals that can answer "is MoLF within 1.5 points of the better of FFT
and LoRA?", from the per-example outcomes of :mod:`molf.sweep.outcomes`.

A method's test cells (one per seed) score the same examples, so its outcomes form a
``[seeds, examples]`` matrix ``X`` of 0/1. The statistic is the mean over all entries,
``mean_e xbar_e`` with ``xbar_e = mean_s X[s, e]``. The interval is a percentile
bootstrap over examples (the seeds of one example stay together, since they share the
example's difficulty): draw ``n`` examples with replacement, ``R`` times, take the 2.5th
and 97.5th percentiles of the resampled means.

Paired difference of two methods A and B on the same examples: the same bootstrap of
``d_e = xbar_e(A) - xbar_e(B)``, resampling examples once for both methods, so the
examples' shared difficulty cancels. A difference is then read against a margin ``m``
(the paper's claim: -1.5 points): "above" when the whole interval lies above ``m``,
"below" when it lies below, else "straddles" (the data cannot tell).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
MARGIN = -0.015  # -1.5 points


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval (as shares, not points)."""

    mean: float
    low: float
    high: float

    def verdict(self, margin: float = MARGIN) -> str:
        """ "above", "below" or "straddles" ``margin`` (see the module docstring)."""
        if self.low > margin:
            return "above"
        if self.high < margin:
            return "below"
        return "straddles"

    def points(self) -> str:
        """``+1.2 [-0.4, +2.9]`` in points (percent)."""
        return f"{100 * self.mean:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"


def example_means(outcomes: list[str]) -> np.ndarray:
    """``xbar_e``: per example, the share of the cells (seeds) that got it right, from
    each cell's outcome string (``"0110..."``, one character per example)."""
    lengths = {len(o) for o in outcomes}
    if len(lengths) != 1:
        raise ValueError(f"cells scored different numbers of examples: {sorted(lengths)}")
    matrix = np.array([[c == "1" for c in o] for o in outcomes], dtype=np.float64)
    return matrix.mean(axis=0)


def bootstrap(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of ``values`` (one per example) and its percentile bootstrap interval."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = np.empty(resamples)
    for start in range(0, resamples, 250):  # bounded memory at any n
        stop = min(start + 250, resamples)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(values.mean()), float(low), float(high))


def method_interval(outcomes: list[str]) -> Interval:
    """A method's test score with its interval, pooled over its seeds' cells."""
    return bootstrap(example_means(outcomes))


def paired_difference(a: list[str], b: list[str]) -> Interval:
    """Method A minus method B on the same examples, with its paired interval."""
    return bootstrap(example_means(a) - example_means(b))
