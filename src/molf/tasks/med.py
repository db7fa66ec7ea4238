"""MedMCQA: four-option medical multiple choice, answered with one letter.

Local files (the MedMCQA release, ``dev.jsonl``) number the correct option ``cop``
from 1; the hub copy (``openlifescienceai/medmcqa``) numbers it from 0. One parser
reads both, told which by ``cop_base``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from molf.tasks.base import Example, TaskData
from molf.tasks.metrics import mean
from molf.tasks.scoring import completion_logprobs, generate
from molf.tasks.sources import (
    Origin,
    describe,
    existing_path,
    field,
    hub_rows,
    limited_task_data,
    parse_rows,
    read_rows,
    split,
    text,
)

HUB_ID = "openlifescienceai/medmcqa"
LOCAL_FILE = "dev.jsonl"  # the file read when --data is a directory
EVAL_FRACTION = 0.2  # share of a single local file held out for evaluation
LETTERS = "ABCD"
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
_LETTER = re.compile(r"\b([ABCD])\b")


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
    """The first standalone capital letter A-D in generated text, as an option index."""
    found = _LETTER.search(generated)
    return None if found is None else LETTERS.index(found.group(1))


def choice_accuracy(option_scores: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Share of questions whose highest-scoring option is the answer (ties: the first)."""
    picks = [list(scores).index(max(scores)) for scores in option_scores]
    return mean([float(p == a) for p, a in zip(picks, answers, strict=True)])


def generation_accuracy(generated: Sequence[str], answers: Sequence[int]) -> float:
    """Share of generations whose first A-D letter is the answer (no letter: wrong)."""
    return mean([float(parse_choice(g) == a) for g, a in zip(generated, answers, strict=True)])


def med_splits(data: str | None, seed: int) -> tuple[list[MedRecord], list[MedRecord], str]:
    """Hub: its train and validation splits. Local: a seeded 80/20 split of one file."""
    if data is None:
        train, skipped_train = parse_rows(hub_rows(HUB_ID, "train"), _hub_parse, skip_bad=True)
        evals, skipped_eval = parse_rows(hub_rows(HUB_ID, "validation"), _hub_parse, skip_bad=True)
        return (
            train,
            evals,
            describe(f"hub:{HUB_ID} (train / validation)", skipped_train + skipped_eval),
        )
    path = existing_path(data)
    if path.is_dir():
        path = existing_path(str(path / LOCAL_FILE))
    records, _ = parse_rows(read_rows(path), _local_parse, skip_bad=False)
    train, evals = split(records, EVAL_FRACTION, seed)
    return train, evals, f"{path} (seeded {1 - EVAL_FRACTION:.0%}/{EVAL_FRACTION:.0%} split)"


class MedTask:
    """MedMCQA multiple choice; results lead with log-likelihood accuracy."""

    name = "med"
    primary_metric = "accuracy"
    max_new_tokens = 16

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",
    ) -> TaskData:
        """Questions to train on and disjoint questions to evaluate on (see ``med_splits``)."""
        train, evals, source = med_splits(data, seed)
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
    ) -> dict[str, float]:
        """Two accuracies over the questions.

        - accuracy: the option letter " A".." D" with the highest mean token
          log-prob after the prompt is the correct one;
        - generation_accuracy: the first standalone A-D letter of the greedy
          generation is the correct one.
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
        return {
            "accuracy": choice_accuracy(per_question, answers),
            "generation_accuracy": generation_accuracy(generated, answers),
        }


def _local_parse(row: dict[str, Any], origin: Origin) -> MedRecord:
    return parse_med_row(row, origin, cop_base=1)


def _hub_parse(row: dict[str, Any], origin: Origin) -> MedRecord:
    return parse_med_row(row, origin, cop_base=0)
