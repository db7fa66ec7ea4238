"""B5: the host overhead of MoLF layers, on a shape where Python, not arithmetic, decides.

Qwen2 with 28 layers, hidden 64, intermediate 128 (the layer count of Qwen2.5-1.5B at a
width where each matmul takes microseconds), 4 x 128 tokens, rank 8, one thread: MoLF's
extra arithmetic is about 4r/3T of the layer's (2%), so any larger MoLF / FFT ratio is
per-layer host work (Python in the layer and the autograd Function, per-parameter work
in the optimizer) — what makes a GPU step host-bound. Each phase is timed on its own,
side by side in one process (forward, backward, optimizer step; variants interleaved),
optionally under ``torch.compile`` (``--compile``: compiled MoLF / compiled FFT) and
under bf16 autocast (``--autocast``: how ``--dtype amp-bf16`` trains, the default on
CUDA). MoLF runs both ways of its fused path: ``recompute`` (the default on the CPU in
fp32) and ``keep`` (the default on accelerators and under autocast; see molf.layer).
MoLF-E (``W`` frozen, experts of rank 2 and 6) runs against PEFT LoRA of rank 8.

    python -m benchmarks.b5_host_overhead [--reps 20] [--compile] [--autocast]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import Qwen2Config

from benchmarks.common import machine, ms, qwen2_model, table, write
from molf import MoLFAdamW, MoLFConfig, get_molf_model

GOAL_EAGER, GOAL_COMPILED = 1.10, 1.05
SHAPE = dict(layers=28, hidden=64, intermediate=128, batch=4, seq=128, rank=8)
# (variant, its baseline): MoLF's fused path both ways (MoLFConfig.fused_weight) against
# FFT, MoLF-E against PEFT LoRA of the same total rank
PAIRS = (("molf-recompute", "fft"), ("molf-keep", "fft"), ("molf-e", "lora"))
LABELS = {
    "molf-recompute": "MoLF, W' rebuilt / FFT",
    "molf-keep": "MoLF, W' kept / FFT",
    "molf-e": "MoLF-E / PEFT LoRA",
}


def _config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=1024,
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=SHAPE["seq"],
        tie_word_embeddings=False,
    )


def _variant(kind: str, base: torch.nn.Module, compiled: bool):
    model = copy.deepcopy(base).train()
    r = SHAPE["rank"]
    if kind == "fft":
        model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    elif kind == "molf-e":
        ranks = (r // 4, r - r // 4)
        cfg = MoLFConfig(
            lora_ranks=ranks,
            lora_alphas=tuple(2 * x for x in ranks),
            train_base=False,
            train_non_linear=False,
        )
        model = get_molf_model(model, cfg)
        opt = MoLFAdamW(model, lr=1e-4)
    else:
        cfg = MoLFConfig(
            lora_ranks=(r,), lora_alphas=(2 * r,), fused_weight=kind.removeprefix("molf-")
        )
        model = get_molf_model(model, cfg)
        opt = MoLFAdamW(model, lr=1e-5, lora_lr=1e-4)
    forward = torch.compile(model) if compiled else model
    return model, forward, opt


def _phases(forward, opt, ids, autocast: bool = False) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = forward(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def measure(compiled: bool, reps: int, warmup: int, autocast: bool = False) -> dict:
    base = qwen2_model(_config())
    ids = torch.randint(
        0, 1024, (SHAPE["batch"], SHAPE["seq"]), generator=torch.Generator().manual_seed(0)
    )
    kinds = list(dict.fromkeys(kind for pair in PAIRS for kind in pair))
    variants = {k: _variant(k, base, compiled) for k in kinds}
    samples = {k: [] for k in variants}
    for rep in range(warmup + reps):
        for kind in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:  # rotating order
            _, forward, opt = variants[kind]
            phases = _phases(forward, opt, ids, autocast)
            if rep >= warmup:
                samples[kind].append([*phases, sum(phases)])
    out = {}
    for kind, baseline in PAIRS:
        ours, theirs = samples[kind], samples[baseline]
        out[kind] = {
            phase: {
                "variant_s": statistics.median(s[i] for s in ours),
                "baseline_s": statistics.median(s[i] for s in theirs),
                "ratio": statistics.median(a[i] / b[i] for a, b in zip(ours, theirs)),
            }
            for i, phase in enumerate(("forward", "backward", "optimizer", "step"))
        }
    return out


def markdown(result: dict) -> str:
    lines = [
        "### B5 host overhead: Qwen2, 28 layers, hidden 64, 4 x 128 tokens, rank 8, "
        f"{result['threads']} thread(s)",
        "",
    ]
    rows = []
    for mode, by_variant in result["modes"].items():
        for kind, phases in by_variant.items():
            for phase, t in phases.items():
                rows.append(
                    [
                        mode,
                        LABELS[kind],
                        phase,
                        f"{t['ratio']:.3f}",
                        ms(t["variant_s"]),
                        ms(t["baseline_s"]),
                    ]
                )
    lines.append(table(["mode", "variant / baseline", "phase", "ratio", "ms", "baseline ms"], rows))
    verdicts = []
    for mode, goal in (("eager", GOAL_EAGER), ("compiled", GOAL_COMPILED)):
        for kind, phases in result["modes"].get(mode, {}).items():
            ratio = phases["step"]["ratio"]
            if dict(PAIRS)[kind] == "fft":  # the goals are MoLF / FFT
                met = "met" if ratio <= goal else "not met"
                verdicts.append(f"{mode} {LABELS[kind]} {ratio:.3f} (goal <= {goal}: {met})")
    lines += ["", "Step ratios: " + "; ".join(verdicts) + "."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--autocast", action="store_true", help="also time eager under bf16 autocast")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "b5_host_overhead",
        "machine": machine(),
        "threads": args.threads,
        "shape": SHAPE,
        "modes": {"eager": measure(False, args.reps, args.warmup)},
    }
    if args.compile:
        result["modes"]["compiled"] = measure(True, args.reps, args.warmup)
    if args.autocast:
        result["modes"]["eager bf16 autocast"] = measure(False, args.reps, args.warmup, True)
    write("b5_host_overhead", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
