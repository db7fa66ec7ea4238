"""CounterFact knowledge injection: teach the model counterfactual edits, then check them.

Training pairs are ``prompt -> " target_new"``, and evaluation uses the SAME records:
the question is whether fine-tuning injected each edit, whether the edit carries over
to paraphrases, and whether unrelated neighbouring facts survived it.

Two row layouts are read by one parser: EasyEdit (``prompt``, ``target_new``,
``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``)
and the hub/ROME layout (``requested_rewrite`` with a ``"{}"`` prompt template,
``paraphrase_prompts``, ``neighborhood_prompts``).

Splits. The edits are both what is trained and what is evaluated, so ``split`` ("val"
to choose settings, "test" to report) picks WHICH edits a run injects and scores:

- a directory with ``counterfact-val.json`` and ``counterfact-edit.json`` (the shared
  CounterFact layout): "val" reads the first, "test" the second, whole (they hold
  disjoint edits); ``counterfact-train.json`` there is not read;
- a directory without them and with exactly one ``.json`` file: as that file;
- a single file, or the hub's train split: the records are cut in two halves by
  ``h = hash_fraction(prompt)`` (sha256 of the fixed ``SPLIT_SALT`` and the normalised
  edit prompt, see :mod:`molf.tasks.sources`): val when ``h < VAL_FRACTION``, test
  otherwise; edits of one prompt stay together, and ``--seed`` does not move them;
- ``builtin``: both splits are the same 24 built-in edits (a tiny demo set, too
  small to hold out from; it does not give a fair val/test protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from molf.errors import MolfError
from molf.tasks.base import DataPath, Example, TaskData
from molf.tasks.encoding import IGNORE_INDEX, collate, encode_example, ensure_pad_token
from molf.tasks.fact_builtin import BUILTIN_FACTS
from molf.tasks.metrics import mean, share_preferred
from molf.tasks.scoring import context_length, inference, model_device, score_completions
from molf.tasks.sources import (
    EVAL_CAP_SEED,
    Origin,
    Row,
    check_split,
    describe,
    existing_path,
    hash_part,
    hub_rows,
    nonempty,
    parse_rows,
    read_rows,
    take,
    text,
    text_list,
)

HUB_ID = "azhx/counterfact"  # the ROME release of CounterFact on the hub
SPLIT_FILES = {"val": "counterfact-val.json", "test": "counterfact-edit.json"}  # in a directory
VAL_FRACTION = 0.5  # a single file or the hub: share of edits (by prompt hash) that is val
METRICS = ("efficacy", "generalization", "specificity")


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


def fact_records(data: str | None, split: str) -> tuple[list[FactRecord], str]:
    """The ``split`` edits of ``data`` (None: hub, "builtin", file or directory) and a
    source description, as the module docstring defines them."""
    if data is None:
        records, skipped = parse_rows(hub_rows(HUB_ID, "train"), parse_fact_row, skip_bad=True)
        source = f"hub:{HUB_ID} ({split}: a prompt-hash half of train)"
        return hash_half(records, split), describe(source, skipped)
    if data == "builtin":
        records, _ = parse_rows(builtin_rows(), parse_fact_row, skip_bad=False)
        return records, "builtin (counterfactual edits written for molf; val = test)"
    path = existing_path(data)
    if path.is_dir():
        chosen = split_file(path, split)
        if chosen is not None:
            return parse_rows(read_rows(chosen), parse_fact_row, skip_bad=False)[0], str(chosen)
        path = only_json(path)
    records, _ = parse_rows(read_rows(path), parse_fact_row, skip_bad=False)
    return hash_half(records, split), f"{path} ({split}: a prompt-hash half of the edits)"


def hash_half(records: list[FactRecord], split: str) -> list[FactRecord]:
    """The val (``hash_fraction(prompt) < VAL_FRACTION``) or test (the rest) records."""
    low, high = (0.0, VAL_FRACTION) if split == "val" else (VAL_FRACTION, 1.0)
    return hash_part(records, lambda r: r.prompt, low, high)


def split_file(directory: Path, split: str) -> Path | None:
    """The directory's file for ``split``; None when it has neither split file."""
    present = [name for name in SPLIT_FILES.values() if (directory / name).is_file()]
    if not present:
        return None
    if len(present) < len(SPLIT_FILES):
        missing = next(n for n in SPLIT_FILES.values() if n not in present)
        raise MolfError(
            f"--data {directory}: has {present[0]} but not {missing}; a CounterFact "
            f"directory needs both ({SPLIT_FILES['val']} for --eval-split val, "
            f"{SPLIT_FILES['test']} for test), or pass a file"
        )
    return directory / SPLIT_FILES[split]


def only_json(directory: Path) -> Path:
    """The one ``.json`` file of a directory without the split files, or a MolfError."""
    candidates = sorted(directory.glob("*.json"))
    if len(candidates) != 1:
        raise MolfError(
            f"--data {directory}: expected {' and '.join(SPLIT_FILES.values())}, or exactly "
            f"one .json file there, found {len(candidates)}; pass the file itself"
        )
    return candidates[0]


class FactTask:
    """Knowledge injection on CounterFact; results lead with efficacy."""

    name = "fact"
    primary_metric = "efficacy"
    settings = ()  # no settings of its own
    max_new_tokens = 16

    def data_path(self, data: str) -> DataPath:
        """The file or directory ``data`` names; none for the built-in edits."""
        return DataPath(None if data == "builtin" else Path(data).expanduser())

    def load(
        self,
        data: str | None,
        *,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        split: str = "test",
    ) -> TaskData:
        """The ``split`` edits (see the module docstring) to inject; the evaluation records
        are (a subset of) the same injected edits. Caps pick the same edits whatever
        ``seed``, so every seed of a study trains and scores one set of edits."""
        records, source = fact_records(data, check_split(split))
        capped = take(records, max_train_samples, EVAL_CAP_SEED, "max_train_samples")
        edits = nonempty(capped, "edits", source)
        train = [Example(r.prompt, answer(r.target_new)) for r in edits]
        evals = take(edits, max_eval_samples, EVAL_CAP_SEED, "max_eval_samples")
        pairs = [Example(r.prompt, answer(r.target_new)) for r in evals]
        return TaskData(train, evals, source, eval_examples=pairs)

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[FactRecord],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        predictions: list[dict[str, Any]] | None = None,
    ) -> dict[str, float]:
        """Edit success as shares of won contests (``max_new_tokens`` is unused).

        Each contest is a prompt and two answers, and is won when the wanted answer
        scores strictly higher (a tie is lost):

        - efficacy: each edit's prompt, " target_new" wanted over " target_true";
        - generalization: the same over every paraphrase prompt;
        - specificity: every neighbourhood prompt, its true answer wanted over
          " target_new" (the edit did not leak).

        Each is scored twice. ``<metric>``: an answer's score is its mean token log-prob
        after the prompt. ``<metric>_first_token``: its score is the log-prob of its first
        token only, both read from the one next-token distribution after the prompt (as
        the authors compare); answers that begin with the same token tie, so lose.

        ``efficacy_margin`` is the mean of wanted minus other (mean token log-probs) over
        the efficacy contests: a continuous score of the same edits, which breaks ties of
        efficacy when a sweep chooses an lr.

        ``predictions`` gets one line per contest: metric, prompt, reference (the wanted
        answer), scores and first_token_scores ({"new": target_new's, "true": the true
        answer's}), correct and correct_first_token; the mean of correct over a metric's
        lines is that metric.
        """
        contests: dict[str, list[tuple[str, str, str]]] = {name: [] for name in METRICS}
        for r in records:
            new, true = answer(r.target_new), answer(r.target_true)
            contests["efficacy"].append((r.prompt, new, true))
            contests["generalization"] += [(p, new, true) for p in r.paraphrases]
            contests["specificity"] += [(p, answer(t), new) for p, t in r.neighbours]
        metrics: dict[str, float] = {}
        first_token: dict[str, float] = {}
        bar = tqdm(total=2 * sum(map(len, contests.values())), desc="evaluating", disable=None)
        for name, items in contests.items():
            scores = contest_scores(model, tokenizer, items, batch_size, progress=bar)
            metrics[name] = share_preferred([s.wanted for s in scores], [s.other for s in scores])
            if name == "efficacy":
                margin = mean([s.wanted - s.other for s in scores])
            first_token[f"{name}_first_token"] = share_preferred(
                [s.wanted_first for s in scores], [s.other_first for s in scores]
            )
            if predictions is not None:
                predictions += [
                    _prediction(name, item, score)
                    for item, score in zip(items, scores, strict=True)
                ]
        bar.close()
        return {**metrics, **first_token, "efficacy_margin": margin}

    def baselines(self, records: list[FactRecord]) -> dict[str, float]:
        """No model-free baseline: {} (before-training scores are the reference)."""
        return {}


@dataclass(frozen=True)
class ContestScore:
    """Scores of one ``(prompt, wanted, other)`` contest (log-probs, <= 0)."""

    wanted: float  # mean token log-prob of the wanted answer after the prompt
    other: float  # the same for the other answer
    wanted_first: float  # log-prob of the wanted answer's first token after the prompt
    other_first: float  # log-prob of the other answer's first token, same distribution


def contest_scores(
    model: Any,
    tokenizer: Any,
    contests: list[tuple[str, str, str]],
    batch_size: int = 8,
    *,
    share_prefix: bool = True,
    progress: Any = None,
) -> list[ContestScore]:
    """A :class:`ContestScore` per ``(prompt, wanted, other)``.

    Each answer is encoded after its prompt as for training (no EOS) and scored by
    :func:`molf.tasks.scoring.score_completions` (``batch_size`` prompts per pass):
    the prompt runs through the model once, with its longer answer; the other is read
    from the same pass (one token) or from the prompt's cached keys and values. The
    first-token scores both come from the distribution that predicts the wanted
    answer's first token. ``share_prefix=False`` runs the evaluation as it was before
    (one right-padded row per answer, logits at every position: the baseline of
    ``benchmarks/b6_eval_scoring.py``); the scores are the same up to float rounding.
    ``progress`` (a tqdm bar) advances by two per contest scored (prefix sharing only).
    """
    limit = context_length(model)
    encoded = [
        encode_example(tokenizer, prompt, completion, max_length=limit, add_eos=False)
        for prompt, wanted, other in contests
        for completion in (wanted, other)
    ]
    answers = [completion for _, wanted, other in contests for completion in (wanted, other)]
    rivals = _rival_first_tokens(encoded, answers)
    if not share_prefix:
        return _padded_contest_scores(model, tokenizer, encoded, rivals, batch_size)
    prompts = [prompt for prompt, _, _ in contests for _ in range(2)]
    scored = score_completions(
        model,
        tokenizer,
        prompts,
        answers,
        batch_size,
        alternatives=[[rivals[i]] if i % 2 == 0 else [] for i in range(len(answers))],
        progress=progress,
    )
    return [
        ContestScore(
            scored[2 * k].mean,
            scored[2 * k + 1].mean,
            scored[2 * k].first,
            scored[2 * k].alternatives[0],
        )
        for k in range(len(contests))
    ]


def _rival_first_tokens(encoded: list[dict[str, Any]], answers: list[str]) -> list[int]:
    """Per encoded answer, the first token of the other answer of its contest (answers
    come in (wanted, other) pairs); an answer without tokens is a MolfError."""
    firsts = []
    for item, completion in zip(encoded, answers, strict=True):
        tokens = [label for label in item["labels"] if label != IGNORE_INDEX]
        if not tokens:
            raise MolfError(f"completion {completion!r} has no tokens to score; make it non-empty")
        firsts.append(tokens[0])
    return [firsts[i ^ 1] for i in range(len(encoded))]  # wanted <-> other of one contest


def _padded_contest_scores(
    model: Any,
    tokenizer: Any,
    encoded: list[dict[str, Any]],
    rivals: list[int],
    batch_size: int,
) -> list[ContestScore]:
    """The evaluation as it was before prefix sharing: one right-padded row per answer,
    logits at every position (the baseline of ``benchmarks/b6_eval_scoring.py``)."""
    pad_id = ensure_pad_token(tokenizer)
    means: list[float] = []
    own_first: list[float] = []
    rival_first: list[float] = []
    with inference(model):
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], pad_id)
            batch = {k: v.to(model_device(model)) for k, v in batch.items()}
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits[:, :-1]
                .float()
            )
            targets = batch["labels"][:, 1:]
            scored = targets != IGNORE_INDEX
            norm = logits.logsumexp(-1)
            picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            token_logp = (picked - norm) * scored
            means.extend((token_logp.sum(-1) / scored.sum(-1)).tolist())
            rows = range(len(targets))
            at = scored.int().argmax(-1)  # the position predicting the first answer token
            rival = torch.tensor(rivals[start : start + len(targets)], device=logits.device)
            own_first.extend(token_logp[rows, at].tolist())
            rival_first.extend((logits[rows, at, rival] - norm[rows, at]).tolist())
    return [
        ContestScore(means[2 * k], means[2 * k + 1], own_first[2 * k], rival_first[2 * k])
        for k in range(len(means) // 2)
    ]


def _prediction(metric: str, contest: tuple[str, str, str], score: ContestScore) -> dict[str, Any]:
    """One predictions line; for specificity the wanted answer is the true one."""
    prompt, wanted, _ = contest
    new_wanted = metric != "specificity"

    def named(wanted_score: float, other_score: float) -> dict[str, float]:
        new, true = (wanted_score, other_score) if new_wanted else (other_score, wanted_score)
        return {"new": new, "true": true}

    return {
        "metric": metric,
        "prompt": prompt,
        "reference": wanted,
        "scores": named(score.wanted, score.other),
        "first_token_scores": named(score.wanted_first, score.other_first),
        "correct": score.wanted > score.other,
        "correct_first_token": score.wanted_first > score.other_first,
    }
