"""Metric functions against hand-computed cases."""

from __future__ import annotations

import pytest

from molf.tasks.med import choice_accuracy, generation_accuracy, parse_choice
from molf.tasks.metrics import mean, share_preferred, text_exact_match


def test_mean() -> None:
    assert mean([1.0, 2.0, 6.0]) == 3.0
    with pytest.raises(ValueError):
        mean([])


def test_share_preferred_counts_strict_wins_only() -> None:
    # wins at 0, tie at 1 (a failure), loss at 2, win at 3
    assert share_preferred([-1.0, -2.0, -3.0, -0.5], [-2.0, -2.0, -1.0, -0.6]) == 0.5
    with pytest.raises(ValueError):
        share_preferred([1.0], [1.0, 2.0])


def test_text_exact_match_ignores_outer_whitespace_only() -> None:
    assert text_exact_match(
        [" Paris\n", "paris", "New  York"], ["Paris", " Paris", "New York"]
    ) == (1 / 3)


@pytest.mark.parametrize(
    ("generated", "choice"),
    [
        (" B", 1),
        ("C. Saltatory conduction", 2),
        (" The answer is D.", 3),
        ("(A)", 0),
        ("Answer: B", 1),  # the A in "Answer" is not a standalone letter
        (" none of these", None),
        (" E", None),
        ("a b c", None),  # capitals only
    ],
)
def test_parse_choice_takes_the_first_standalone_letter(generated: str, choice: int | None) -> None:
    assert parse_choice(generated) == choice


def test_choice_accuracy_picks_the_best_scored_option_first_on_ties() -> None:
    scores = [[-1.0, -0.5, -2.0, -3.0], [-1.0, -1.0, -2.0, -2.0], [-4.0, -3.0, -2.0, -1.0]]
    # picks: B (1), A (0: first of a tie), D (3)
    assert choice_accuracy(scores, [1, 1, 3]) == pytest.approx(2 / 3)


def test_generation_accuracy_counts_unparsable_as_wrong() -> None:
    assert generation_accuracy([" A", " I think C", "no idea", " D"], [0, 2, 1, 0]) == 0.5
