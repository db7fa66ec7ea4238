"""B2: one training step (forward + backward + optimizer step), MoLF vs its baselines.

Qwen2-shaped models (random weights), ``--batch x --seq`` tokens per step (default
2 x 512 = 1,024), the same batch for every variant:

* FFT: every parameter trained, ``torch.optim.AdamW(fused=True)``;
* MoLF: r=128 (alpha 32, rsLoRA, dropout 0) on every linear layer, base and the rest
  trained, MoLFAdamW (LoRA gradients from dL/dW, the fused path); at hidden 512 and 1024;
* MoLF-E: ranks 32 + 128, base and everything else frozen, MoLFAdamW;
* PEFT LoRA: rank 160 (alpha 160), the same targets, only the adapters trained,
  AdamW(fused=True).

The variants take turns; each step's time includes ``zero_grad(set_to_none=True)``.

    python -m benchmarks.b2_train_step [--hiddens 512 1024 --reps 5]
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.common import (
    goal,
    interleaved,
    machine,
    ms,
    numel,
    qwen2_config,
    qwen2_model,
    table,
    write,
)
from molf import MoLFAdamW, MoLFConfig, get_molf_model

GOAL = 1.10
LAYERS = {512: 6, 1024: 4}


def build_variant(kind: str, base, **molf_kw):
    """(model, optimizer) for ``kind`` in fft / molf / molf-e / lora, from a copy of ``base``."""
    model = copy.deepcopy(base)
    if kind == "fft":
        model.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    if kind == "molf":
        cfg = MoLFConfig(lora_ranks=(128,), lora_alphas=(32,), **molf_kw)
        model = get_molf_model(model, cfg)
        return model, MoLFAdamW(model, lr=1e-5, lora_lr=1e-4)
    if kind == "molf-e":
        cfg = MoLFConfig(
            lora_ranks=(32, 128),
            lora_alphas=(32, 128),
            train_base=False,
            train_non_linear=False,
            **molf_kw,
        )
        model = get_molf_model(model, cfg)
        return model, MoLFAdamW(model, lr=1e-4)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=160,
            lora_alpha=160,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            bias="none",
        )
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-4, fused=True)
    raise ValueError(kind)


def train_step(model, opt, batch, autocast_dtype=None):
    device = batch.device.type

    def step():
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def batch_for(config, batch: int, seq: int, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)


def compare(
    pairs, hidden, layers, batch, seq, reps, warmup, device="cpu", dtype=None, compiled=False
):
    """Time each (name, kind, baseline kind) pair in ``pairs`` on one base model
    (``compiled``: every variant under ``torch.compile``)."""
    config = qwen2_config(hidden, layers, seq=seq)
    base = qwen2_model(config, device=device).train()
    ids = batch_for(config, batch, seq, device)
    variants, info = {}, {}
    for kind in dict.fromkeys(k for pair in pairs for k in pair):
        model, opt = build_variant(kind, base)
        model.train()
        variants[kind] = train_step(torch.compile(model) if compiled else model, opt, ids, dtype)
        info[kind] = {
            "trainable_params": numel(p for p in model.parameters() if p.requires_grad),
            "optimizer": type(opt).__name__,
        }
    stats = {}
    for kind, baseline in pairs:
        s = interleaved(
            {kind: variants[kind], baseline: variants[baseline]},
            reps=reps,
            warmup=warmup,
            device=device,
            baseline=baseline,
        )
        stats[f"{kind}/{baseline}"] = s
    return {
        "hidden": hidden,
        "layers": layers,
        "tokens_per_step": batch * seq,
        "params": numel(base.parameters()),
        "variants": info,
        "stats": stats,
    }


def run(
    hiddens=(512, 1024), batch=2, seq=512, reps=5, warmup=2, more_tokens=4, compiled=False
) -> dict:
    """MoLF / FFT at each hidden size and MoLF-E / LoRA at the first; with
    ``more_tokens``, MoLF / FFT again at the first size with that many times the batch
    (MoLF's extra matmuls cost O(r d^2) per step, FFT's O(tokens d^2): the ratio falls)."""
    result = {"benchmark": "b2_train_step", "machine": machine(), "reps": reps, "runs": []}
    result["compiled"] = compiled
    for hidden in hiddens:
        pairs = [("molf", "fft")] + ([("molf-e", "lora")] if hidden == hiddens[0] else [])
        layers = LAYERS.get(hidden, 4)
        result["runs"].append(
            compare(pairs, hidden, layers, batch, seq, reps, warmup, compiled=compiled)
        )
    if more_tokens > 1:
        hidden = hiddens[0]
        layers = LAYERS.get(hidden, 4)
        tokens = batch * more_tokens
        run_ = compare(
            [("molf", "fft")], hidden, layers, tokens, seq, reps, warmup, compiled=compiled
        )
        run_["extra"] = True
        result["runs"].append(run_)
    return result


def markdown(result: dict) -> str:
    mode = ", every variant under torch.compile" if result.get("compiled") else ""
    lines = [f"### B2 training step (forward + backward + optimizer{mode})", ""]
    rows, verdicts = [], []
    for run_ in result["runs"]:
        for pair, s in run_["stats"].items():
            kind, baseline = pair.split("/")
            ratio = s[kind]["ratio"]
            rows.append(
                [
                    f"hidden {run_['hidden']}, {run_['layers']} layers "
                    f"({run_['params'] / 1e6:.0f}M)",
                    run_["tokens_per_step"],
                    f"{kind} / {baseline}",
                    f"{ratio:.3f}",
                    ms(s[kind]["median_s"]),
                    ms(s[baseline]["median_s"]),
                ]
            )
            if not run_.get("extra"):
                verdicts.append(
                    f"{kind}/{baseline} at hidden {run_['hidden']}: {ratio:.3f} "
                    f"({goal(ratio <= GOAL)})"
                )
    lines.append(table(["model", "tokens", "pair", "time ratio", "ms", "baseline ms"], rows))
    tokens = result["runs"][0]["tokens_per_step"]
    lines += ["", f"Goal <= {GOAL} at {tokens} tokens: " + "; ".join(verdicts) + "."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hiddens", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--more-tokens", type=int, default=4, help="extra MoLF/FFT row: batch x N")
    ap.add_argument("--compile", action="store_true", help="every variant under torch.compile")
    args = ap.parse_args(argv)
    result = run(
        tuple(args.hiddens),
        args.batch,
        args.seq,
        args.reps,
        args.warmup,
        args.more_tokens,
        args.compile,
    )
    write("b2_train_step", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
