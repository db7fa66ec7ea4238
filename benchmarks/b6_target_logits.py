"""B6: the training loss from logits at target positions only, vs transformers' loss.

A prompt-heavy batch (4 rows of 448-512 tokens whose last 40 are the answer: a SQL
schema and question, then the query) on a 2-layer Gemma-3 shape with Gemma-3-270M's
262,144-token vocabulary, random weights. One forward and backward each way, side by
side in one process: ``model(**batch).loss`` (logits at every position, as
transformers computes it from ``labels``) and :func:`molf.train.loop.target_loss`
(``logits_to_keep`` = the positions some row reads a label from). Both give the same
loss and gradients (tests/train/test_units.py); this measures what the vocabulary
projection over the prompt costs.

    python -m benchmarks.b6_target_logits [--reps 5]
"""

from __future__ import annotations

import argparse

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from benchmarks.common import interleaved, machine, ms, table, write
from molf.train.loop import target_loss, target_positions

VOCAB, ROWS, ANSWER = 262_144, 4, 40


def build(seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
    config = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=1024,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).train()
    lengths = [512, 480, 464, 448]
    ids = torch.randint(0, VOCAB, (ROWS, max(lengths)))
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):  # right-padded, as molf's collate pads
        labels[row, n - ANSWER : n] = ids[row, n - ANSWER : n]
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    num_targets = int((labels[:, 1:] != -100).sum())
    return model, batch, num_targets


def run(reps: int, warmup: int) -> dict:
    model, batch, num_targets = build()
    positions = target_positions(batch["labels"])

    def every_position():
        model.zero_grad(set_to_none=True)
        model(**batch, num_items_in_batch=num_targets).loss.backward()

    def target_positions_only():
        model.zero_grad(set_to_none=True)
        target_loss(model, batch, positions, num_targets).backward()

    stats = interleaved(
        {"every position": every_position, "target positions": target_positions_only},
        reps=reps,
        warmup=warmup,
        baseline="every position",
    )
    seq = batch["input_ids"].shape[1]
    kept = {"every position": seq, "target positions": len(positions)}
    return {
        "machine": machine(),
        "tokens": ROWS * seq,
        "variants": {
            name: {
                "median_s": s["median_s"],
                "ratio": s.get("ratio", 1.0),
                "positions": kept[name],
                "logits_mb": ROWS * kept[name] * VOCAB * 4 / 2**20,
            }
            for name, s in stats.items()
        },
    }


def markdown(result: dict) -> str:
    rows = [
        [name, f"{v['ratio']:.2f}", ms(v["median_s"]), v["positions"], f"{v['logits_mb']:.0f}"]
        for name, v in result["variants"].items()
    ]
    return "\n".join(
        [
            f"### B6 target logits: Gemma-3 shape, vocab {VOCAB:,}, {ROWS} rows of 448-512 "
            f"tokens, {ANSWER}-token answers (forward + backward)",
            "",
            table(["loss from", "time / every position", "ms", "positions", "logits MB"], rows),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    result = run(args.reps, args.warmup)
    write("b6_target_logits", result, markdown(result))


if __name__ == "__main__":
    main()
