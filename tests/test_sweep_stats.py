"""Bootstrap intervals and paired differences of the sweep's per-example outcomes,
against slow, obvious re-implementations; outcome lines from real predictions files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from molf.errors import MolfError
from molf.sweep.outcomes import cell_outcome, read_outcomes, write_outcomes
from molf.sweep.stats import Interval, bootstrap, example_means, method_interval, paired_difference


def _slow_bootstrap(per_seed: list[list[int]], resamples: int, seed: int) -> tuple[float, float]:
    """Resample example indices one draw at a time; the mean over all seeds' entries."""
    rng = np.random.default_rng(seed)
    n = len(per_seed[0])
    means = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=(1, n))[0]
        total = sum(row[i] for row in per_seed for i in idx)
        means.append(total / (len(per_seed) * n))
    return tuple(np.percentile(means, [2.5, 97.5]))


def _outcome(bits: list[int]) -> str:
    return "".join(str(b) for b in bits)


def test_the_interval_matches_a_slow_bootstrap_over_examples_with_seeds_together():
    rng = random.Random(0)
    seeds = [[int(rng.random() < 0.7) for _ in range(40)] for _ in range(2)]
    got = bootstrap(example_means([_outcome(s) for s in seeds]), resamples=300, seed=3)
    low, high = _slow_bootstrap(seeds, resamples=300, seed=3)
    assert got.mean == pytest.approx(sum(map(sum, seeds)) / 80)
    assert (got.low, got.high) == pytest.approx((low, high))
    assert got.low < got.mean < got.high


def test_a_paired_difference_cancels_shared_difficulty():
    rng = random.Random(1)
    hard = [rng.random() < 0.5 for _ in range(200)]
    a = _outcome([int(h) for h in hard])
    b = _outcome([int(h and i % 10 != 0) for i, h in enumerate(hard)])  # loses a few
    paired = paired_difference([a], [b])
    unpaired_width = method_interval([a]).high - method_interval([a]).low
    assert paired.mean == pytest.approx((a.count("1") - b.count("1")) / 200)
    assert paired.low >= 0 and paired.high - paired.low < unpaired_width / 2


@pytest.mark.parametrize(
    ("interval", "verdict"),
    [
        (Interval(0.0, -0.01, 0.02), "above"),
        (Interval(-0.05, -0.08, -0.02), "below"),
        (Interval(-0.01, -0.03, 0.01), "straddles"),
    ],
)
def test_the_verdict_reads_the_interval_against_minus_one_and_a_half_points(interval, verdict):
    assert interval.verdict() == verdict


def test_cells_of_different_lengths_are_not_pooled():
    with pytest.raises(ValueError, match="different numbers of examples"):
        example_means(["0101", "011"])


def test_a_cells_outcome_keeps_the_primary_metrics_after_lines_in_order(tmp_path):
    lines = [
        {"stage": "before", "metric": "efficacy", "prompt": "p0", "correct": True},
        {"stage": "after", "metric": "efficacy", "prompt": "p0", "correct": False},
        {"stage": "after", "metric": "specificity", "prompt": "n0", "correct": True},
        {"stage": "after", "metric": "efficacy", "prompt": "p1", "correct": True},
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = cell_outcome("m/t/fft/lr1e-04/test-s0", tmp_path, "efficacy")
    assert got["correct"] == "01" and got["metric"] == "efficacy"
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.jsonl").write_text(
        "".join(json.dumps({**x, "correct": True}) + "\n" for x in lines)
    )
    assert cell_outcome("c", other, "efficacy")["prompts"] == got["prompts"]  # same examples
    assert cell_outcome("c", tmp_path / "none", "efficacy") is None
    path = tmp_path / "results" / "outcomes.jsonl"
    path.parent.mkdir()
    write_outcomes(path, {got["cell"]: got})
    assert read_outcomes(path) == {got["cell"]: got}
    path.write_text("not json\n")
    with pytest.raises(MolfError, match="outcomes.jsonl:1"):
        read_outcomes(path)
    path.write_text(json.dumps({**got, "routing": "{'experts': ['fft']}"}) + "\n")
    with pytest.raises(MolfError, match="outcomes.jsonl:1"):  # a str where a mapping goes
        read_outcomes(path)


def test_a_routed_cells_outcome_keeps_its_routing_shares(tmp_path):
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    rng = random.Random(2)
    steps = []
    for step in range(1, 24):
        winners = [[rng.randrange(2)] for _ in modules]
        scores = [[rng.random(), rng.random()] for _ in modules]
        if step == 1:
            scores = [[0.0, 0.0] for _ in modules]  # warm-up: lr 0, no decision
        steps.append({"step": step, "winners": winners, "scores": scores})
    header = {"modules": modules, "experts": ["fft", "lora0"]}
    (tmp_path / "routing.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [header, *steps]))
    (tmp_path / "predictions.jsonl").write_text(
        json.dumps({"stage": "after", "prompt": "p", "correct": True}) + "\n"
    )
    (tmp_path / "eval.json").write_text("{}")
    routing = cell_outcome("c", tmp_path, "accuracy")["routing"]

    def slow(lines, keep=lambda m: True):  # wins over decided module-steps, by hand
        wins, decided = [0, 0], 0
        for line in lines:
            for m, (won, scores) in enumerate(zip(line["winners"], line["scores"])):
                if keep(m) and any(scores):
                    decided += 1
                    for e in won:
                        wins[e] += 1
        return [round(w / max(1, decided), 4) for w in wins]

    assert routing["experts"] == ["fft", "lora0"]
    assert routing["all"] == slow(steps)
    assert routing["by_type"] == {
        "q_proj": slow(steps, lambda m: m == 0),
        "down_proj": slow(steps, lambda m: m == 1),
    }
    assert len(routing["by_tenth"]) == 10
    assert routing["by_tenth"][-1] == slow(steps[-2:])  # 23 steps: the last tenth has 2
    assert cell_outcome("c", tmp_path / "..", "accuracy") is None  # no predictions there
