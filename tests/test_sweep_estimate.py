"""--dry-run's estimate of a cell: steps x seconds per step + examples x seconds per
evaluated example, both measured on a finished cell (molf.sweep.estimate)."""

from __future__ import annotations

import math

import pytest

from molf.sweep.estimate import estimate_text, measured_rates, planned_steps
from molf.train.args import TrainArgs


def _args(**kw) -> TrainArgs:
    return TrainArgs(task="fact", data="builtin", **kw)


def test_planned_steps_from_max_steps_or_epochs_over_the_capped_examples():
    assert planned_steps(_args(max_steps=16)) == 16
    args = _args(epochs=2, max_train_samples=512, batch_size=32)
    assert planned_steps(args) == math.ceil(2 * 512 / 32)
    assert planned_steps(_args(epochs=2, max_train_samples=100, batch_size=8, grad_accum=2)) == 13
    assert planned_steps(_args(epochs=2)) is None  # the whole split: unknown here


def test_a_cell_is_estimated_from_a_finished_cells_rates_per_step_and_per_example():
    ref = _args(epochs=2, max_train_samples=512, max_eval_samples=512, batch_size=32)
    row = {"cell": "m/t/fft/lr1e-04/val-s0", "train_seconds": "320", "wall_seconds": "576"}
    rates = measured_rates(row, ref)  # 32 steps of 10 s; 256 s over 512 examples
    assert rates.per_step == pytest.approx(10.0) and rates.per_example == pytest.approx(0.5)
    big = _args(epochs=2, max_train_samples=2048, max_eval_samples=2048, batch_size=32)
    text, wall = estimate_text(big, rates)
    assert wall == pytest.approx(128 * 10.0 + 2048 * 0.5)
    assert "128 steps x 10.0 s" in text and "2048 examples x 0.50 s" in text
    uncapped = _args(epochs=2, batch_size=32)  # counts unknown: the finished cell's own times
    assert estimate_text(uncapped, rates)[1] == pytest.approx(320 + 256)
