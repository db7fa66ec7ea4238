"""B4: how MoLFAdamW's step time scales with parameters and with the number of modules.

* sizes: Qwen2 shapes of growing size (r=128 on every linear layer); time per step
  and per million parameters, next to AdamW(fused=True) on the same parameters;
* module counts: the same number of parameters (about 16.8M in linear weights) split
  into N = 16, 64, 256 square MoLF layers (``d x d``, r = d / 8, with bias), so
  ``(t(N) - t(16)) / (N - 16)`` is the cost of one more module (its four tensors).

    python -m benchmarks.b4_scaling [--reps 7]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from benchmarks.common import (
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

SIZES = ((512, 2), (512, 6), (768, 8))
MODULES = (16, 64, 256)
TOTAL = 1 << 24  # linear weight elements in the module-count series


def _with_grads(model, seed=1):
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3)
    return params


def _time(model, params, reps, warmup):
    molf = MoLFAdamW(model, lr=1e-4, lora_lr=1e-12)  # FFT wins: the worst case
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    stats = interleaved(
        {"molf": molf.step, "adamw-fused": fused.step},
        reps=reps,
        warmup=warmup,
        baseline="adamw-fused",
    )
    return stats, molf.last_implementation


def run(reps=7, warmup=2) -> dict:
    result = {"benchmark": "b4_scaling", "machine": machine(), "reps": reps}
    sizes = []
    for hidden, layers in SIZES:
        model = get_molf_model(
            qwen2_model(qwen2_config(hidden, layers)),
            MoLFConfig(lora_ranks=(128,), lora_alphas=(32,)),
        )
        params = _with_grads(model)
        stats, impl = _time(model, params, reps, warmup)
        sizes.append(
            {
                "hidden": hidden,
                "layers": layers,
                "params": numel(params),
                "tensors": len(params),
                "stats": stats,
                "implementation": impl,
            }
        )
        del model, params
    result["sizes"] = sizes
    counts = []
    for n in MODULES:
        d = int(math.isqrt(TOTAL // n))
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(d, d) for _ in range(n)])
        model = get_molf_model(model, MoLFConfig(lora_ranks=(d // 8,), lora_alphas=(16,)))
        params = _with_grads(model)
        stats, impl = _time(model, params, reps, warmup)
        counts.append(
            {
                "modules": n,
                "d": d,
                "rank": d // 8,
                "params": numel(params),
                "tensors": len(params),
                "stats": stats,
                "implementation": impl,
            }
        )
        del model, params
    result["module_counts"] = counts
    # Linear fits: seconds per parameter (sizes), seconds per extra module (counts).
    per_param = [s["stats"]["molf"]["median_s"] / s["params"] for s in sizes]
    result["us_per_mparam"] = [p * 1e12 for p in per_param]
    first, last = counts[0], counts[-1]
    for name in ("molf", "adamw-fused"):
        dt = last["stats"][name]["median_s"] - first["stats"][name]["median_s"]
        result[f"{name}_us_per_module"] = dt / (last["modules"] - first["modules"]) * 1e6
    return result


def markdown(result: dict) -> str:
    rows = []
    for s, per in zip(result["sizes"], result["us_per_mparam"]):
        st = s["stats"]
        rows.append(
            [
                f"Qwen2 hidden {s['hidden']} x {s['layers']}",
                f"{s['params'] / 1e6:.1f}M",
                s["tensors"],
                ms(st["molf"]["median_s"]),
                f"{per:.0f}",
                ms(st["adamw-fused"]["median_s"]),
                f"{st['molf']['ratio']:.2f}",
            ]
        )
    for c in result["module_counts"]:
        st = c["stats"]
        rows.append(
            [
                f"{c['modules']} x Linear({c['d']}), r={c['rank']}",
                f"{c['params'] / 1e6:.1f}M",
                c["tensors"],
                ms(st["molf"]["median_s"]),
                f"{st['molf']['median_s'] / c['params'] * 1e12:.0f}",
                ms(st["adamw-fused"]["median_s"]),
                f"{st['molf']['ratio']:.2f}",
            ]
        )
    head = [
        "model",
        "params",
        "tensors",
        "MoLF ms",
        "MoLF us / M params",
        "AdamW(fused) ms",
        "MoLF / AdamW",
    ]
    per = result["us_per_mparam"]
    return "\n".join(
        [
            "### B4 scaling of the optimizer step (FFT winning everywhere)",
            "",
            table(head, rows),
            "",
            f"Per million parameters: {min(per):.0f}-{max(per):.0f} us across a "
            f"{result['sizes'][-1]['params'] / result['sizes'][0]['params']:.1f}x range of "
            "sizes (linear growth). One more module (4 tensors) at a fixed parameter count: "
            f"MoLF {result['molf_us_per_module']:.1f} us, AdamW(fused) "
            f"{result['adamw-fused_us_per_module']:.1f} us.",
        ]
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    result = run(args.reps, args.warmup)
    write("b4_scaling", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
