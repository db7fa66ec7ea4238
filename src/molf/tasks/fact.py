"""CounterFact knowledge injection: teach the model counterfactual edits, then check them.

Training pairs are ``prompt -> " target_new"``, and evaluation uses the SAME records:
the question is whether fine-tuning injected each edit, whether the edit carries over
to paraphrases, and whether unrelated neighbouring facts survived it.

Two row layouts are read by one parser: EasyEdit (``prompt``, ``target_new``,
``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``)
and the hub/ROME layout (``requested_rewrite`` with a ``"{}"`` prompt template,
``paraphrase_prompts``, ``neighborhood_prompts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks.base import Example, TaskData
from molf.tasks.fact_builtin import BUILTIN_FACTS
from molf.tasks.metrics import share_preferred
from molf.tasks.scoring import completion_logprobs
from molf.tasks.sources import (
    Origin,
    Row,
    describe,
    existing_path,
    hub_rows,
    nonempty,
    parse_rows,
    read_rows,
    take,
    text,
    text_list,
)

HUB_ID = "azhx/counterfact"  # the ROME release of CounterFact on the hub
DIR_FILE = "counterfact-train.json"  # the file read when --data is a directory


@dataclass(frozen=True)
class FactRecord:
    """One edit: the fact's prompt, the new (false) and true answers, and its probes."""

    prompt: str
    target_new: str
    target_true: str
    paraphrases: tuple[str, ...]
    neighbours: tuple[tuple[str, str], ...]  # (prompt, true answer) the edit must not change


def answer(target: str) -> str:
    """The completion form of an answer: one leading space, as it follows the prompt."""
    return " " + target.strip()


def parse_fact_row(row: dict[str, Any], origin: Origin) -> FactRecord:
    """A record from either layout (ROME when ``requested_rewrite`` is present)."""
    if "requested_rewrite" in row:
        template = text(row, "requested_rewrite.prompt", origin)
        if "{}" not in template:
            raise origin.error("requested_rewrite.prompt", "must contain '{}' for the subject")
        subject = text(row, "requested_rewrite.subject", origin)
        true = text(row, "requested_rewrite.target_true.str", origin)
        return FactRecord(
            prompt=template.replace("{}", subject),
            target_new=text(row, "requested_rewrite.target_new.str", origin),
            target_true=true,
            paraphrases=text_list(row, "paraphrase_prompts", origin),
            neighbours=tuple((p, true) for p in text_list(row, "neighborhood_prompts", origin)),
        )
    return FactRecord(
        prompt=text(row, "prompt", origin),
        target_new=text(row, "target_new", origin),
        target_true=text(row, "ground_truth", origin),
        paraphrases=(text(row, "rephrase_prompt", origin),),
        neighbours=(
            (text(row, "locality_prompt", origin), text(row, "locality_ground_truth", origin)),
        ),
    )


def builtin_rows() -> list[Row]:
    """The built-in edits as EasyEdit-layout rows, so they go through the same parser."""
    keys = (
        "prompt",
        "target_new",
        "ground_truth",
        "rephrase_prompt",
        "locality_prompt",
        "locality_ground_truth",
    )
    return [
        (Origin("builtin", n), dict(zip(keys, fact, strict=True)))
        for n, fact in enumerate(BUILTIN_FACTS, 1)
    ]


def fact_rows(data: str | None) -> tuple[list[Row], str]:
    """Rows and a source description for ``data``: None (hub), "builtin", file or directory."""
    if data is None:
        return hub_rows(HUB_ID, "train"), f"hub:{HUB_ID}"
    if data == "builtin":
        return builtin_rows(), "builtin (counterfactual edits written for molf)"
    path = existing_path(data)
    if path.is_dir():
        path = _file_in(path)
    return read_rows(path), str(path)


def _file_in(directory: Path) -> Path:
    if (directory / DIR_FILE).is_file():
        return directory / DIR_FILE
    candidates = sorted(directory.glob("*.json"))
    if len(candidates) != 1:
        raise MolfError(
            f"--data {directory}: expected {DIR_FILE} or exactly one .json file there, "
            f"found {len(candidates)}; pass the file itself"
        )
    return candidates[0]


class FactTask:
    """Knowledge injection on CounterFact; results lead with efficacy."""

    name = "fact"
    primary_metric = "efficacy"
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
        """Edits to inject; the evaluation records are (a seeded subset of) the same edits."""
        rows, source = fact_rows(data)
        records, skipped = parse_rows(rows, parse_fact_row, skip_bad=data is None)
        source = describe(source, skipped)
        edits = nonempty(
            take(records, max_train_samples, seed, "max_train_samples"), "edits", source
        )
        train = [Example(r.prompt, answer(r.target_new)) for r in edits]
        return TaskData(train, take(edits, max_eval_samples, seed, "max_eval_samples"), source)

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[FactRecord],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
    ) -> dict[str, float]:
        """Edit success, scored by mean token log-prob (``max_new_tokens`` is unused).

        - efficacy: share of records whose prompt prefers " target_new" over the true answer;
        - generalization: the same share over all paraphrase prompts;
        - specificity: share of neighbourhood prompts whose true answer still beats
          " target_new" (the edit did not leak).
        """
        contests: dict[str, list[tuple[str, str, str]]] = {
            "efficacy": [],
            "generalization": [],
            "specificity": [],
        }
        for r in records:
            new, true = answer(r.target_new), answer(r.target_true)
            contests["efficacy"].append((r.prompt, new, true))
            contests["generalization"] += [(p, new, true) for p in r.paraphrases]
            contests["specificity"] += [(p, answer(t), new) for p, t in r.neighbours]
        return {
            name: preferred_share(model, tokenizer, items, batch_size)
            for name, items in contests.items()
        }


def preferred_share(
    model: Any, tokenizer: Any, contests: list[tuple[str, str, str]], batch_size: int
) -> float:
    """Share of ``(prompt, wanted, other)`` contests where ``wanted`` has the higher score."""
    prompts = [p for p, _, _ in contests]
    wanted = completion_logprobs(model, tokenizer, prompts, [w for _, w, _ in contests], batch_size)
    other = completion_logprobs(model, tokenizer, prompts, [o for _, _, o in contests], batch_size)
    return share_preferred(wanted, other)
