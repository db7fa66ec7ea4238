"""Metric functions against hand-computed cases."""

from __future__ import annotations

import pytest

from molf.tasks.med import choice_accuracy, generation_accuracy, parse_choice
from molf.tasks.metrics import (
    majority_share,
    mean,
    share_preferred,
    text_exact_match,
    text_matches,
)


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


def test_text_matches_and_majority_share() -> None:
    assert text_matches(" Paris\n", "Paris") and not text_matches("paris", "Paris")
    assert majority_share(["B", "A", "B", "C"]) == 0.5
    assert majority_share([3]) == 1.0
    with pytest.raises(ValueError):
        majority_share([])


@pytest.mark.parametrize(
    ("generated", "choice"),
    [
        # answer forms
        (" B", 1),
        ("C", 2),
        ("C.", 2),
        (" C)", 2),
        ("(C)", 2),
        ("**D**", 3),
        ('"A"', 0),
        ("A\nQuestion: Which nerve ...", 0),
        ("C. Saltatory conduction", 2),
        ("A. 45 years", 0),
        (" The answer is D.", 3),
        ("Answer: B", 1),  # the A of "Answer" is not a letter on its own
        ("The correct answer is: (B)", 1),
        ("answer is option D", 3),
        ("I would choose option (A) here", 0),
        ("The nerve is spared, so (B)", 1),
        ("A patient with cough; answer C", 2),  # the article first, then the answer
        # no answer: articles, letters inside words or names, lower case, E
        ("A 45-year-old man presents with chest pain", None),
        ("A patient with fever and rash", None),
        (" A lot of things", None),
        ("Vitamin C.", None),
        ("Hepatitis B virus", None),
        ("B12 deficiency", None),
        ("Answers: A lot", None),
        ("the answer is a nerve", None),
        (" none of these", None),
        (" E", None),
        ("a b c", None),
    ],
)
def test_parse_choice_reads_letters_in_answer_form_only(generated: str, choice: int | None) -> None:
    assert parse_choice(generated) == choice


def test_choice_accuracy_picks_the_best_scored_option_first_on_ties() -> None:
    scores = [[-1.0, -0.5, -2.0, -3.0], [-1.0, -1.0, -2.0, -2.0], [-4.0, -3.0, -2.0, -1.0]]
    # picks: B (1), A (0: first of a tie), D (3)
    assert choice_accuracy(scores, [1, 1, 3]) == pytest.approx(2 / 3)


def test_generation_accuracy_counts_unparsable_as_wrong() -> None:
    # right, right, unparsable, an article (no answer), wrong
    generated = [" A", " I think the answer is C", "no idea", "A 45-year-old", " D"]
    assert generation_accuracy(generated, [0, 2, 1, 0, 0]) == 0.4
