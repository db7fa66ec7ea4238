"""MedMCQA: four-option medical multiple choice, answered with one letter.

Local files (the MedMCQA release, ``dev.jsonl``) number the correct option ``cop``
from 1; the hub copy (``openlifescienceai/medmcqa``) numbers it from 0. One parser
reads both, told which by ``cop_base``.

Splits (``split`` of :meth:`MedTask.load`: "val" chooses settings, "test" reports):

- a local file: each question goes to train, val or test by
  ``h = hash_fraction(question)`` (sha256 of the fixed ``SPLIT_SALT`` and the question's
  normalised text, see :mod:`molf.tasks.sources`): train when ``h < TRAIN_FRACTION``,
  val when ``h < TRAIN_FRACTION + VAL_FRACTION``, test otherwise (70/15/15). The split
  does not depend on ``--seed``, file order or caps, and duplicate questions share one.
- the hub: its train split trains; its validation split is cut in two by the same hash,
  ``h < HUB_VAL_FRACTION`` for val and the rest for test.

Both splits always train on the same train questions; ``split`` only picks the
held-out questions to evaluate on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molf.tasks.base import DataPath, Example, TaskData
from molf.tasks.metrics import choice_margin, majority_share, mean
from molf.tasks.scoring import completion_logprobs, generate
from molf.tasks.sources import (
    Origin,
    check_split,
    describe,
    existing_path,
    field,
    hash_part,
    hub_rows,
    limited_task_data,
    parse_rows,
    read_rows,
    text,
)

HUB_ID = "openlifescienceai/medmcqa"
LOCAL_FILE = "dev.jsonl"  # the file read when --data is a directory
TRAIN_FRACTION = 0.70  # local file: share of questions (by hash) trained on
VAL_FRACTION = 0.15  # local file: share held out as val; the remaining 0.15 is test
HUB_VAL_FRACTION = 0.5  # hub: share of its validation split (by hash) that is val
LETTERS = "ABCD"
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
# An answer letter in answer form (see parse_choice), first match in the text wins.
_ANSWER = re.compile(
    r"""
    \A[\s*"'`]*\(?(?P<lead>[ABCD])(?=[ \t]*(?:\n|\Z)|[.):,;*\]"])   # text opens with it
    | \((?P<paren>[ABCD])\)                                         # "(C)" anywhere
    | \b(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:=-]?\s*[(*]*  # after a cue word
      (?P<cued>[ABCD])(?![\w'-])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class MedRecord:
    question: str
    options: tuple[str, ...]  # four options, in A-D order
    answer: int  # 0-based index of the correct option


def parse_med_row(row: dict[str, Any], origin: Origin, cop_base: int) -> MedRecord:
    """A record from a MedMCQA row whose ``cop`` counts from ``cop_base`` (1 local, 0 hub)."""
    options = []
    for name in OPTION_FIELDS:
        option = field(row, name, origin)
        if not isinstance(option, str):
            raise origin.error(name, f"must be a string, got {option!r}")
        options.append(option)
    cop = field(row, "cop", origin)
    if isinstance(cop, bool) or not isinstance(cop, int) or not 0 <= cop - cop_base < 4:
        raise origin.error(
            "cop", f"must be an integer from {cop_base} to {cop_base + 3}, got {cop!r}"
        )
    return MedRecord(text(row, "question", origin), tuple(options), cop - cop_base)


def med_prompt(record: MedRecord) -> str:
    """Question, the lettered options, then "Answer:"; the completion is " <letter>"."""
    lines = [f"Question: {record.question.strip()}"]
    lines += [
        f"{letter}. {option.strip()}"
        for letter, option in zip(LETTERS, record.options, strict=True)
    ]
    return "\n".join([*lines, "Answer:"])


def med_example(record: MedRecord) -> Example:
    return Example(med_prompt(record), " " + LETTERS[record.answer])


def parse_choice(generated: str) -> int | None:
    """The option index of the first capital A-D written in answer form, or None.

    Answer form is one of:

    - the letter opening the text (after spaces, quotes, ``*`` or ``(``), then ending
      the text or its line or followed by one of ``. ) : , ; * ] "``: "C", "C.", "C)",
      "(C)", "**C**", "C. <option text>";
    - the letter in parentheses anywhere: "... so (C)";
    - the letter standing alone after the word answer, option or choice, optionally
      with "is" and ":" between: "Answer: C", "The answer is C", "option (B)" (here a
      capital A is read as the letter, whatever follows).

    So the article of "A 45-year-old man ..." is no answer, nor is the C of "Vitamin
    C." in running text; a lower-case letter never is.
    """
    found = _ANSWER.search(generated)
    if found is None:
        return None
    letter = found.group("lead") or found.group("paren") or found.group("cued")
    return LETTERS.index(letter)


def best_choice(scores: Sequence[float]) -> int:
    """Index of the highest score (ties: the first)."""
    return list(scores).index(max(scores))


def choice_accuracy(option_scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of questions whose highest-scoring option is the answer (ties: the first)."""
    picks = [best_choice(scores) for scores in option_scores]
    return mean([float(p == a) for p, a in zip(picks, answers, strict=True)])


def generation_accuracy(generated: Sequence[str], answers: Sequence[int]) -> float:
    """Share of generations whose ``parse_choice`` is the answer (no letter: wrong)."""
    return mean([float(parse_choice(g) == a) for g, a in zip(generated, answers, strict=True)])


def med_splits(data: str | None, split: str) -> tuple[list[MedRecord], list[MedRecord], str]:
    """(train, held-out ``split`` questions, source) as the module docstring defines them."""
    if data is None:
        train, skipped_train = parse_rows(hub_rows(HUB_ID, "train"), _hub_parse, skip_bad=True)
        held, skipped_eval = parse_rows(hub_rows(HUB_ID, "validation"), _hub_parse, skip_bad=True)
        low, high = (0.0, HUB_VAL_FRACTION) if split == "val" else (HUB_VAL_FRACTION, 1.0)
        source = f"hub:{HUB_ID} (train; {split}: a question-hash half of validation)"
        return (
            train,
            hash_part(held, _key, low, high),
            describe(source, skipped_train + skipped_eval),
        )
    path = existing_path(data)
    if path.is_dir():
        path = existing_path(str(path / LOCAL_FILE))
    records, _ = parse_rows(read_rows(path), _local_parse, skip_bad=False)
    bounds = {
        "val": (TRAIN_FRACTION, TRAIN_FRACTION + VAL_FRACTION),
        "test": (TRAIN_FRACTION + VAL_FRACTION, 1.0),
    }
    shares = f"{TRAIN_FRACTION:.0%}/{VAL_FRACTION:.0%}/{1 - TRAIN_FRACTION - VAL_FRACTION:.0%}"
    return (
        hash_part(records, _key, 0.0, TRAIN_FRACTION),
        hash_part(records, _key, *bounds[split]),
        f"{path} (question-hash train/val/test {shares}; evaluating {split})",
    )


class MedTask:
    """MedMCQA multiple choice; results lead with log-likelihood accuracy."""

    name = "med"
    primary_metric = "accuracy"
    settings = ()  # no settings of its own
    max_new_tokens = 16

    def data_path(self, data: str) -> DataPath:
        """The file or directory ``data`` names."""
        return DataPath(Path(data).expanduser())

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",
    ) -> TaskData:
        """Train questions and the held-out ``split`` ("val" or "test") questions, as the
        module docstring defines them; ``seed`` only orders the capped samples."""
        train, evals, source = med_splits(data, check_split(split))
        return limited_task_data(
            train,
            evals,
            source,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            seed=seed,
            to_example=med_example,
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[MedRecord],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        predictions: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Two accuracies over the questions.

        - accuracy: the option letter " A".." D" with the highest mean token
          log-prob after the prompt is the correct one (ties: the first letter);
        - generation_accuracy: ``parse_choice`` of the greedy generation is the
          correct one (no letter in answer form: wrong);
        - accuracy_margin: the mean over questions of the correct letter's log-prob minus
          the best other letter's (> 0 when right): a continuous score of the same
          questions, which breaks ties of accuracy when a sweep chooses an lr.

        ``predictions`` gets per question: prompt, reference (the letter), output, scores
        (letter -> log-prob), correct (for accuracy), generation_correct.
        """
        prompts = [med_prompt(r) for r in records]
        answers = [r.answer for r in records]
        scores = completion_logprobs(
            model,
            tokenizer,
            [p for p in prompts for _ in LETTERS],
            [" " + letter for _ in prompts for letter in LETTERS],
            batch_size,
        )
        per_question = [scores[i : i + len(LETTERS)] for i in range(0, len(scores), len(LETTERS))]
        generated = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        if predictions is not None:
            for prompt, answer, option_scores, output in zip(
                prompts, answers, per_question, generated, strict=True
            ):
                predictions.append(
                    {
                        "prompt": prompt,
                        "reference": LETTERS[answer],
                        "output": output,
                        "scores": dict(zip(LETTERS, option_scores, strict=True)),
                        "correct": best_choice(option_scores) == answer,
                        "generation_correct": parse_choice(output) == answer,
                    }
                )
        return {
            "accuracy": choice_accuracy(per_question, answers),
            "generation_accuracy": generation_accuracy(generated, answers),
            "accuracy_margin": choice_margin(per_question, answers),
        }

    def baselines(self, records: list[MedRecord]) -> dict[str, float]:
        """Accuracies without a model: chance_accuracy, 1/4 (a uniform random letter), and
        majority_accuracy, the share of ``records`` whose answer is their most frequent
        answer letter (MedMCQA's letters are unbalanced, so this is the line to beat)."""
        return {
            "chance_accuracy": 1 / len(LETTERS),
            "majority_accuracy": majority_share([r.answer for r in records]),
        }


def _key(record: MedRecord) -> str:
    return record.question


def _local_parse(row: dict[str, Any], origin: Origin) -> MedRecord:
    return parse_med_row(row, origin, cop_base=1)


def _hub_parse(row: dict[str, Any], origin: Origin) -> MedRecord:
    return parse_med_row(row, origin, cop_base=0)
