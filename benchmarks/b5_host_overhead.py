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
KEPT = ("recompute", "keep")  # the fused path's two ways (MoLFConfig.fused_weight)


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
    if kind == "fft":
        model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    else:
        r, kept = SHAPE["rank"], kind.removeprefix("molf-")
        cfg = MoLFConfig(lora_ranks=(r,), lora_alphas=(2 * r,), fused_weight=kept)
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
    kinds = ["fft", *(f"molf-{k}" for k in KEPT)]
    variants = {k: _variant(k, base, compiled) for k in kinds}
    samples = {k: [] for k in variants}
    for rep in range(warmup + reps):
        for kind in kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]:  # rotating order
            _, forward, opt = variants[kind]
            phases = _phases(forward, opt, ids, autocast)
            if rep >= warmup:
                samples[kind].append([*phases, sum(phases)])
    out = {}
    for kept in KEPT:
        molf, fft = samples[f"molf-{kept}"], samples["fft"]
        out[kept] = {
            phase: {
                "molf_s": statistics.median(s[i] for s in molf),
                "fft_s": statistics.median(s[i] for s in fft),
                "ratio": statistics.median(a[i] / b[i] for a, b in zip(molf, fft)),
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
    for mode, by_kept in result["modes"].items():
        for kept, phases in by_kept.items():
            for phase, s in phases.items():
                rows.append(
                    [mode, kept, phase, f"{s['ratio']:.3f}", ms(s["molf_s"]), ms(s["fft_s"])]
                )
    lines.append(table(["mode", "W'", "phase", "MoLF / FFT", "MoLF ms", "FFT ms"], rows))
    verdicts = []
    for mode, goal in (("eager", GOAL_EAGER), ("compiled", GOAL_COMPILED)):
        for kept, phases in result["modes"].get(mode, {}).items():
            ratio = phases["step"]["ratio"]
            met = "met" if ratio <= goal else "not met"
            verdicts.append(f"{mode} {kept} {ratio:.3f} (goal <= {goal}: {met})")
    lines += ["", "Step MoLF / FFT: " + "; ".join(verdicts) + "."]
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
