"""B1: one optimizer step, MoLFAdamW vs torch.optim.AdamW on the same parameters.

A Qwen2-shaped model (random weights) with MoLF experts (r=128) on every linear layer;
every trainable parameter (FFT and LoRA experts, embeddings, norms) gets a fixed random
gradient. MoLFAdamW (each implementation) and AdamW(fused=True) / AdamW(foreach=True)
over the same parameter list take turns. Two routings: FFT winning every layer (the
worst case: the LoRA experts' moments move but their weights are never written; made
by a tiny lora_lr) and LoRA winning every layer (a tiny lr). "grad_norm given" is
``step(grad_norm=...)``, as molf's training loop calls it when it clips gradients: the
norm stands in for the optimizer's own non-finite pass.

    python -m benchmarks.b1_optimizer [--hidden 512 --layers 6 --reps 9]
"""

from __future__ import annotations

import argparse
import functools

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

GOAL = 1.3  # MoLFAdamW / AdamW(fused=True), FFT winning everywhere


def build(hidden: int, layers: int, rank: int = 128, seed: int = 0):
    model = get_molf_model(
        qwen2_model(qwen2_config(hidden, layers), seed),
        MoLFConfig(lora_ranks=(rank,), lora_alphas=(32,)),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed + 1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3)
    return model, params


def run(hidden: int = 512, layers: int = 6, reps: int = 9, warmup: int = 2) -> dict:
    model, params = build(hidden, layers)
    routings = {"fft-everywhere": (1e-4, 1e-12), "lora-everywhere": (1e-12, 1e-4)}
    result: dict = {
        "benchmark": "b1_optimizer",
        "machine": machine(),
        "model": {
            "hidden": hidden,
            "layers": layers,
            "rank": 128,
            "trainable_params": numel(params),
            "lora_params": sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n),
            "tensors": len(params),
        },
        "reps": reps,
        "routings": {},
    }
    for routing, (lr, lora_lr) in routings.items():
        # Two groups, each timed side by side with its own AdamW(fused) baseline: the
        # foreach optimizers allocate and free full-size temporaries, whose page faults
        # would otherwise land in the neighbouring measurements of the fast ones.
        opts, stats = {}, {}
        for group in (("cpu_kernel",), ("foreach",)):
            variants = {}
            for impl in group:
                try:
                    opts[impl] = MoLFAdamW(model, lr=lr, lora_lr=lora_lr, implementation=impl)
                except Exception as exc:  # no C compiler: report it, time the rest
                    result.setdefault("errors", []).append(f"{impl}: {exc}")
                    continue
                variants[f"molf-{impl}"] = opts[impl].step
            if "cpu_kernel" in opts and "cpu_kernel" in group:
                # molf's training loop hands in clip_grad_norm_'s norm: no pass 1.
                given = MoLFAdamW(model, lr=lr, lora_lr=lora_lr, implementation="cpu_kernel")
                variants["molf-cpu_kernel, grad_norm given"] = functools.partial(
                    given.step, grad_norm=torch.tensor(1.0)
                )
            variants["adamw-fused"] = torch.optim.AdamW(params, lr=lr, fused=True).step
            if "foreach" in group:
                variants["adamw-foreach"] = torch.optim.AdamW(params, lr=lr, foreach=True).step
            fast = "cpu_kernel" in group
            got = interleaved(
                variants,
                reps=3 * reps if fast else reps,  # 15 ms a step: cheap to repeat
                warmup=warmup + 1,
                baseline="adamw-fused",
            )
            if not fast:
                got["adamw-fused (foreach group)"] = got.pop("adamw-fused")
            stats.update(got)
            del variants
        winners = {}
        for impl, opt in opts.items():
            sel = opt.last_routing.selected.float().mean(0).tolist()
            winners[impl] = dict(zip(opt.last_routing.experts, sel))
            assert opt.last_implementation == impl
        result["routings"][routing] = {"stats": stats, "winner_fraction": winners}
        del opts
    return result


def markdown(result: dict) -> str:
    m = result["model"]
    lines = [
        f"### B1 optimizer step: Qwen2 hidden {m['hidden']}, {m['layers']} layers, r=128 "
        f"on all linear layers ({m['trainable_params'] / 1e6:.1f}M trainable params, "
        f"{m['lora_params'] / 1e6:.1f}M of them LoRA; {m['tensors']} tensors)",
        "",
    ]
    rows = []
    for routing, r in result["routings"].items():
        for name, s in r["stats"].items():
            rows.append([routing, name, f"{s['ratio']:.2f}", ms(s["median_s"]), ms(s["min_s"])])
    lines.append(
        table(["routing", "optimizer", "time / AdamW(fused)", "median ms", "min ms"], rows)
    )
    worst = result["routings"]["fft-everywhere"]["stats"].get("molf-cpu_kernel")
    if worst is not None:
        lines += [
            "",
            f"Goal: MoLFAdamW <= {GOAL}x AdamW(fused) with FFT winning everywhere: "
            f"{worst['ratio']:.2f}x, {goal(worst['ratio'] <= GOAL)}.",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    result = run(args.hidden, args.layers, args.reps, args.warmup)
    write("b1_optimizer", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
