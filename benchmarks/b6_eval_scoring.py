"""B6-eval: CounterFact evaluation with each prompt run once, vs one row per answer.

``FactTask.evaluate`` scores three contests per edit (efficacy, generalization,
specificity), each a prompt with two answers. Four ways to score the same contests, side
by side in one process (interleaved, rotating order; the ratio is the median of the
per-repetition ratios to the first):

- ``rows, all logits``: the evaluation before (``contest_scores(...,
  share_prefix=False)``): one right-padded row per answer, logits at every position;
- ``rows, answer logits``: ``score_completions(..., share_prefix=False)`` (what a model
  without a cache gets): one left-padded row per prompt and its longer answer, the
  vocabulary projected only where answer tokens are predicted, a one-token answer read
  from its rival's row; a prompt with two longer answers gets two rows;
- ``shared prompt``: the default (``contest_scores``): as above, but a prompt's second
  longer answer is scored from the prompt's cached keys and values, in a second pass,
  when that saves enough (``scoring.SHARE_MIN_SAVING``);
- ``shared prompt, always``: the same with ``SHARE_MIN_SAVING = 0``: every prompt with
  two longer answers is fed once.

It reports the wall-time ratios, the forward passes and tokens each way feeds the model,
and the largest absolute difference of any score (mean and first-token log-probs) from
the old path.

    python -m benchmarks.b6_eval_scoring [--edits 64] [--reps 3] [--quick]

``--quick``: the tiny stories260k model from ``$MOLF_DATA_DIR/models/stories260k`` (a
smoke run, seconds); otherwise SmolLM2-135M in fp32 (the packaged model, offline).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.common import interleaved, machine, ms, table, write
from molf.tasks import get_task, scoring
from molf.tasks.encoding import IGNORE_INDEX, encode_example
from molf.tasks.fact import METRICS, ContestScore, answer, contest_scores
from molf.tasks.scoring import context_length, score_completions

# the shared data folder: $MOLF_DATA_DIR, else ../shared/data next to the repository
DATA = Path(
    os.environ.get("MOLF_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")
)
VARIANTS = ("rows, all logits", "rows, answer logits", "shared prompt", "shared prompt, always")


def contests_of(records) -> dict[str, list[tuple[str, str, str]]]:
    """The contests ``FactTask.evaluate`` builds, by metric."""
    contests: dict[str, list[tuple[str, str, str]]] = {name: [] for name in METRICS}
    for r in records:
        new, true = answer(r.target_new), answer(r.target_true)
        contests["efficacy"].append((r.prompt, new, true))
        contests["generalization"] += [(p, new, true) for p in r.paraphrases]
        contests["specificity"] += [(p, answer(t), new) for p, t in r.neighbours]
    return contests


def answer_rows(model, tokenizer, contests, batch_size: int) -> list[ContestScore]:
    """``contest_scores`` through the row path of ``score_completions``."""
    limit = context_length(model)
    answers = [c for _, wanted, other in contests for c in (wanted, other)]
    firsts = [
        next(
            t for t in encode_example(tokenizer, p, c, limit, False)["labels"] if t != IGNORE_INDEX
        )
        for (p, _, _), c in zip([x for x in contests for _ in range(2)], answers, strict=True)
    ]
    scored = score_completions(
        model,
        tokenizer,
        [p for p, _, _ in contests for _ in range(2)],
        answers,
        batch_size,
        alternatives=[[firsts[i + 1]] if i % 2 == 0 else [] for i in range(len(answers))],
        share_prefix=False,
    )
    return [
        ContestScore(s.mean, o.mean, s.first, s.alternatives[0])
        for s, o in zip(scored[::2], scored[1::2], strict=True)
    ]


def score_all(variant: str, model, tokenizer, contests, batch_size: int) -> list[float]:
    """Every score of every contest (wanted, other, both first-token scores), flat."""
    out: list[float] = []
    for items in contests.values():
        if variant == "rows, all logits":
            scores = contest_scores(model, tokenizer, items, batch_size, share_prefix=False)
        elif variant == "rows, answer logits":
            scores = answer_rows(model, tokenizer, items, batch_size)
        elif variant == "shared prompt":
            scores = contest_scores(model, tokenizer, items, batch_size)
        else:
            default, scoring.SHARE_MIN_SAVING = scoring.SHARE_MIN_SAVING, 0.0
            try:
                scores = contest_scores(model, tokenizer, items, batch_size)
            finally:
                scoring.SHARE_MIN_SAVING = default
        out += [x for s in scores for x in (s.wanted, s.other, s.wanted_first, s.other_first)]
    return out


def fed_tokens(model, run) -> tuple[int, int, int]:
    """(forward calls, token positions fed including padding, real tokens) of ``run()``."""
    seen = [0, 0, 0]

    def count(module, args, kwargs) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen[0] += 1
        seen[1] += ids.numel()
        seen[2] += int(mask[:, -ids.shape[1] :].sum())

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen[0], seen[1], seen[2]


def load(quick: bool):
    if quick:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = DATA / "models" / "stories260k"
        return (
            AutoModelForCausalLM.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            ("stories260k (fp32)"),
        )
    from molf.train.modeling import load_model_and_tokenizer

    model, tokenizer, _, _ = load_model_and_tokenizer("smollm2-135m", None, "fp32")
    return model, tokenizer, "SmolLM2-135M (fp32)"


def run(edits: int, reps: int, warmup: int, batch_size: int, quick: bool) -> dict:
    host = machine()  # the load average at the start
    t0 = time.perf_counter()
    model, tokenizer, name = load(quick)
    model.eval()
    load_s = time.perf_counter() - t0
    records = (
        get_task("fact")
        .load(str(DATA / "counterfact"), split="val", max_eval_samples=edits, seed=0)
        .eval
    )
    contests = contests_of(records)
    calls = {
        v: (lambda v=v: score_all(v, model, tokenizer, contests, batch_size)) for v in VARIANTS
    }
    scores = {v: torch.tensor(call()) for v, call in calls.items()}
    fed = {v: fed_tokens(model, call) for v, call in calls.items()}
    stats = interleaved(calls, reps=reps, warmup=warmup, baseline=VARIANTS[0])
    base = scores[VARIANTS[0]]
    return {
        "machine": host,
        "model": name,
        "load_s": load_s,
        "edits": len(records),
        "contests": {k: len(v) for k, v in contests.items()},
        "batch_size": batch_size,
        "variants": {
            v: {
                "median_s": stats[v]["median_s"],
                "min_s": stats[v]["min_s"],
                "ratio": stats[v].get("ratio", 1.0),
                "per_edit_s": stats[v]["median_s"] / len(records),
                "forward_calls": fed[v][0],
                "positions_fed": fed[v][1],
                "real_tokens_fed": fed[v][2],
                "max_abs_diff": float((scores[v] - base).abs().max()),
                "max_rel_diff": float(
                    ((scores[v] - base).abs() / base.abs().clamp(min=1e-6)).max()
                ),
                "same_decisions": _decisions(scores[v]) == _decisions(base),
            }
            for v in VARIANTS
        },
    }


def _decisions(flat: torch.Tensor) -> list[tuple[bool, bool]]:
    """Each contest's (won, won by first token)."""
    s = flat.view(-1, 4)
    return list(zip((s[:, 0] > s[:, 1]).tolist(), (s[:, 2] > s[:, 3]).tolist(), strict=True))


def markdown(result: dict) -> str:
    rows = [
        [
            v,
            f"{x['ratio']:.3f}",
            ms(x["median_s"]),
            ms(x["per_edit_s"]),
            x["forward_calls"],
            x["positions_fed"],
            x["real_tokens_fed"],
            f"{x['max_abs_diff']:.2e}",
            "yes" if x["same_decisions"] else "NO",
        ]
        for v, x in result["variants"].items()
    ]
    n = result["contests"]
    return "\n".join(
        [
            f"### B6-eval CounterFact evaluation: {result['model']}, {result['edits']} edits "
            f"({n['efficacy']} + {n['generalization']} + {n['specificity']} contests), "
            f"batch size {result['batch_size']}, {result['machine']['torch_threads']} thread(s)",
            "",
            table(
                [
                    "scoring",
                    "time / rows, all logits",
                    "ms",
                    "ms / edit",
                    "forwards",
                    "positions fed",
                    "real tokens",
                    "max abs score diff",
                    "same wins",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8, help="FactTask.evaluate's default")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a busy host)"
    )
    ap.add_argument("--quick", action="store_true", help="stories260k: a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.edits, args.reps, args.warmup, args.batch_size, args.quick)
    write("b6_eval_scoring" + ("_quick" if args.quick else ""), result, markdown(result))


if __name__ == "__main__":
    main()
