"""B3: peak memory of a few training steps, each configuration in a fresh process.

On the CPU the measure is the process's peak resident set size (``ru_maxrss``), taken
in a child process per configuration that imports torch, builds the model of B2
(hidden 512 by default), and runs ``--steps`` training steps of ``--batch x --seq``
tokens. Goals:

* MoLF <= 1.05 x (FFT + the LoRA experts' parameters, gradients and two Adam moments);
* MoLF-E <= 1.05 x PEFT LoRA of the same total rank (160).

    python -m benchmarks.b3_memory [--hidden 512 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

from benchmarks.common import goal, machine, table, write

GOAL = 1.05
CONFIGS = ("fft", "molf", "molf-keep", "molf-foreach", "molf-e", "lora")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(kind: str, hidden: int, layers: int, batch: int, seq: int, steps: int) -> dict:
    """Runs in the fresh process: returns the peak RSS and the parameter counts."""
    import torch

    from benchmarks.b2_train_step import batch_for, build_variant, train_step
    from benchmarks.common import qwen2_config, qwen2_model

    torch.manual_seed(0)
    before = _rss_mib()
    config = qwen2_config(hidden, layers, seq=seq)
    base = qwen2_model(config).train()
    # molf-keep: W' kept for backward (the default under autocast and off the CPU)
    kept = {"fused_weight": "keep"} if kind == "molf-keep" else {}
    model, opt = build_variant(kind.replace("-foreach", "").replace("-keep", ""), base, **kept)
    if kind == "molf-foreach":
        from molf import MoLFAdamW

        opt = MoLFAdamW(model, lr=1e-5, lora_lr=1e-4, implementation="foreach")
    del base
    model.train()
    step = train_step(model, opt, batch_for(config, batch, seq))
    built = _rss_mib()
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {
        "kind": kind,
        "peak_rss_mib": peak,
        "rss_after_imports_mib": before,
        "rss_after_build_mib": built,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_params": lora,
        "implementation": getattr(opt, "last_implementation", None),
    }


def run(hidden=512, layers=6, batch=2, seq=512, steps=3, configs=CONFIGS) -> dict:
    result = {"benchmark": "b3_memory", "machine": machine(), "steps": steps, "configs": {}}
    result.update(hidden=hidden, layers=layers, tokens_per_step=batch * seq)
    for kind in configs:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.b3_memory",
            "--child",
            kind,
            "--hidden",
            str(hidden),
            "--layers",
            str(layers),
            "--batch",
            str(batch),
            "--seq",
            str(seq),
            "--steps",
            str(steps),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            result["configs"][kind] = {"error": out.stderr[-2000:]}
            continue
        result["configs"][kind] = json.loads(out.stdout.strip().splitlines()[-1])
    c = result["configs"]
    if all("peak_rss_mib" in c.get(k, {}) for k in ("fft", "molf", "molf-e", "lora")):
        lora_states = c["molf"]["lora_params"] * 4 * 4 / 2**20  # fp32 param, grad, m, v
        result["goals"] = {
            "molf": {
                "peak_mib": c["molf"]["peak_rss_mib"],
                "budget_mib": GOAL * (c["fft"]["peak_rss_mib"] + lora_states),
                "ratio": c["molf"]["peak_rss_mib"] / (c["fft"]["peak_rss_mib"] + lora_states),
                "lora_states_mib": lora_states,
            },
            "molf-e": {
                "peak_mib": c["molf-e"]["peak_rss_mib"],
                "budget_mib": GOAL * c["lora"]["peak_rss_mib"],
                "ratio": c["molf-e"]["peak_rss_mib"] / c["lora"]["peak_rss_mib"],
            },
        }
    return result


def markdown(result: dict) -> str:
    lines = [
        f"### B3 peak memory (process peak RSS, fresh process per row; hidden "
        f"{result['hidden']}, {result['layers']} layers, {result['tokens_per_step']} tokens, "
        f"{result['steps']} steps)",
        "",
    ]
    rows = []
    for kind, c in result["configs"].items():
        if "error" in c:
            rows.append([kind, "error", "", "", ""])
            continue
        rows.append(
            [
                kind,
                round(c["peak_rss_mib"]),
                round(c["peak_rss_mib"] - c["rss_after_imports_mib"]),
                f"{c['trainable_params'] / 1e6:.1f}M",
                c["implementation"] or "torch AdamW(fused)",
            ]
        )
    lines.append(
        table(["config", "peak RSS MiB", "above imports MiB", "trainable", "optimizer"], rows)
    )
    g = result.get("goals")
    if g:
        m, e = g["molf"], g["molf-e"]
        lines += [
            "",
            f"Goal MoLF <= {GOAL} x (FFT + LoRA states = {m['lora_states_mib']:.0f} MiB): "
            f"{m['ratio']:.3f}, {goal(m['ratio'] <= GOAL)}. "
            f"Goal MoLF-E <= {GOAL} x PEFT LoRA: {e['ratio']:.3f}, {goal(e['ratio'] <= GOAL)}.",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(
            json.dumps(
                child(args.child, args.hidden, args.layers, args.batch, args.seq, args.steps)
            )
        )
        return None
    result = run(args.hidden, args.layers, args.batch, args.seq, args.steps, args.configs)
    write("b3_memory", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
