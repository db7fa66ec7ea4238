"""Where a B2 training step's time goes on a GPU: forward, backward and optimizer timed
apart with CUDA events, and the top kernels from torch.profiler, for FFT and MoLF at
Qwen2.5-1.5B shapes (bf16 autocast). Explains the gap that ``gpu_check.py`` reports.

    python -m benchmarks.gpu_profile_b2 [--layers N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.gpu_check import Ctx, _ids, _variant


def phases(model, opt, ids, reps: int = 5) -> dict[str, float]:
    """Median milliseconds of forward, backward and optimizer step."""
    times: dict[str, list[float]] = {
        "forward": [],
        "backward": [],
        "optimizer": [],
        "forward_cpu": [],
    }
    for i in range(reps + 2):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        ev[0].record()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        cpu_ms = (time.perf_counter() - t0) * 1e3  # host time to enqueue the forward
        ev[1].record()
        loss.backward()
        ev[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev[3].record()
        torch.cuda.synchronize()
        if i >= 2:
            for k, (a, b) in zip(list(times)[:3], zip(ev, ev[1:])):
                times[k].append(a.elapsed_time(b))
            times["forward_cpu"].append(cpu_ms)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def top_kernels(model, opt, ids, n: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    ctx = Ctx(argparse.Namespace(smoke=False, layers=args.layers, reps=5))
    ids = _ids(ctx)
    out_dir = Path(os.environ.get("OUT", "benchmarks/out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result, tables = {}, []
    base = ctx.model()
    impl = "triton" if "triton" in ctx.impls else "foreach"
    for name, kind, path in (
        ("fft", "fft", None),
        ("molf-fused", "molf", "fused"),
        ("molf-dual", "molf", "dual"),
    ):
        model, opt = _variant(ctx, kind, base, impl if kind == "molf" else "auto")
        for layer in model.modules():
            if path is not None and hasattr(layer, "grad_path"):
                layer.grad_path = path
        result[name] = phases(model, opt, ids)
        tables.append(f"### {name}\n\n```\n{top_kernels(model, opt, ids)}\n```\n")
        del model, opt
        torch.cuda.empty_cache()
    for name in ("molf-fused", "molf-dual"):
        result[f"{name} / fft"] = {k: result[name][k] / result["fft"][k] for k in result["fft"]}
    text = "## B2 phases on the GPU (ms, median)\n\n" + json.dumps(result, indent=1) + "\n\n"
    text += "\n".join(tables)
    (out_dir / "gpu_profile_b2.md").write_text(text)
    print(text[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
