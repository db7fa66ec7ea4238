"""Profiler evidence for the gaps: torch.profiler's top ops, MoLF next to its baseline.

* B1: ``MoLFAdamW.step()`` (FFT winning everywhere) vs ``AdamW(fused=True).step()`` on
  the B1 model; MoLFAdamW's passes appear as named ranges (``MoLFAdamW.nonfinite``,
  ``MoLFAdamW.cpu_kernel_step``, ``MoLFAdamW.plain_adamw``).
* B2: a training step of MoLF vs FFT (hidden 512 and 1024, 1,024 tokens): self CPU time
  per op, and MoLF's extra per op.

Each number is a median over rounds that profile one call of each side in turn.

    python -m benchmarks.profile_gaps [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.b1_optimizer import build
from benchmarks.b2_train_step import LAYERS, batch_for, build_variant, train_step
from benchmarks.common import machine, qwen2_config, qwen2_model, table, write
from molf import MoLFAdamW


def _profile_pair(fns: dict, steps: int) -> dict[str, dict[str, tuple[float, int]]]:
    """Per function: {op: (median self CPU ms per call, calls per call)}, profiling one
    call of each function in turn (ABAB...), ``steps`` rounds after 2 warm-up calls each:
    a burst of load on the machine then hits one round, not one function."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    samples: dict[str, list[dict]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(steps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fns[name]()
            samples[name].append(
                {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
            )
    out = {}
    for name, runs in samples.items():
        keys = set().union(*runs)
        out[name] = {
            k: (statistics.median(r.get(k, (0.0, 0))[0] for r in runs), runs[0].get(k, (0, 0))[1])
            for k in keys
        }
    return out


def _compare(a: dict, b: dict, names=("molf", "baseline"), top: int = 12) -> str:
    keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0))[0], b.get(k, (0, 0))[0]))
    rows = []
    for k in keys[:top]:
        ta, ca = a.get(k, (0.0, 0))
        tb, cb = b.get(k, (0.0, 0))
        rows.append([k[:48], f"{ta:.1f}", ca, f"{tb:.1f}", cb, f"{ta - tb:+.1f}"])
    total_a = sum(v[0] for v in a.values())
    total_b = sum(v[0] for v in b.values())
    rows.append(
        ["(all ops)", f"{total_a:.1f}", "", f"{total_b:.1f}", "", f"{total_a - total_b:+.1f}"]
    )
    head = [
        "op (self CPU)",
        f"{names[0]} ms/step",
        "calls",
        f"{names[1]} ms/step",
        "calls",
        "extra ms",
    ]
    return table(head, rows)


def b1(steps: int) -> tuple[dict, str]:
    model, params = build(512, 6)
    molf = MoLFAdamW(model, lr=1e-4, lora_lr=1e-12)
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    profs = _profile_pair({"molf": molf.step, "fused": fused.step}, 3 * steps)
    # MoLFAdamW's named ranges hold the C loops: their total (not self) time.
    ranges = {}
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            molf.step()
        for e in prof.key_averages():
            if e.key.startswith("MoLFAdamW.") or e.key.startswith("Optimizer.step"):
                ranges.setdefault(e.key, []).append(e.cpu_time_total / 1e3)
    ranges = {k: statistics.median(v) for k, v in ranges.items()}
    rows = [[k, f"{v:.2f}"] for k, v in sorted(ranges.items(), key=lambda kv: -kv[1])]
    md = "\n".join(
        [
            "#### B1: MoLFAdamW.step() (cpu_kernel, FFT winning) vs AdamW(fused=True)",
            "",
            "Time inside MoLFAdamW's named ranges (ms per step; the C loops run inside them):",
            "",
            table(["range", "ms/step"], rows),
            "",
            _compare(profs["molf"], profs["fused"], ("MoLFAdamW", "AdamW(fused)"), top=8),
        ]
    )
    return {**profs, "ranges": ranges}, md


def b2(hidden: int, steps: int) -> tuple[dict, str]:
    config = qwen2_config(hidden, LAYERS.get(hidden, 4))
    base = qwen2_model(config).train()
    ids = batch_for(config, 2, 512)
    fns = {}
    for kind in ("molf", "fft"):
        model, opt = build_variant(kind, base)
        fns[kind] = train_step(model, opt, ids)
    profs = _profile_pair(fns, steps)
    md = "\n".join(
        [
            f"#### B2: training step at hidden {hidden} ({LAYERS.get(hidden, 4)} layers, "
            "1,024 tokens), MoLF vs FFT",
            "",
            _compare(profs["molf"], profs["fft"], ("MoLF", "FFT")),
        ]
    )
    return profs, md


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="profiled rounds (medians)")
    ap.add_argument("--hiddens", type=int, nargs="+", default=[512, 1024])
    args = ap.parse_args(argv)
    result: dict = {"benchmark": "profile_gaps", "machine": machine()}
    parts = ["### Profiler evidence (torch.profiler, self CPU time per op)", ""]
    result["b1"], md = b1(args.steps)
    parts += [md, ""]
    for hidden in args.hiddens:
        result[f"b2_{hidden}"], md = b2(hidden, args.steps)
        parts += [md, ""]
    write("profile_gaps", result, "\n".join(parts).rstrip())
    return result


if __name__ == "__main__":
    main()
