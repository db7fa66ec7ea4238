"""Shared pieces of the benchmarks: model shapes, interleaved timing, tables, JSON.

Every comparison is timed side by side in one process: each repetition runs every
variant once, in a rotating order (ABC, BCA, CAB, ...), after warm-up rounds. We
report the median of the per-repetition ratios to the baseline (robust to the load
drifting during the run) and the median absolute times.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

OUT_DIR = Path(os.environ.get("MOLF_BENCH_OUT", Path(__file__).resolve().parent / "out"))


def qwen2_config(hidden: int, layers: int, *, vocab: int = 8192, seq: int = 512, **kw):
    """A Qwen2 shape: GQA with 64-wide heads (hidden/64 query heads, 1/4 as many KV
    heads), an MLP 3x as wide, untied embeddings."""
    from transformers import Qwen2Config

    heads = max(1, hidden // 64)
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        **kw,
    )


def qwen2_model(config, seed: int = 0, dtype=torch.float32, device="cpu"):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model


def numel(params) -> int:
    return sum(p.numel() for p in params)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    variants: dict[str, Callable[[], object]],
    *,
    reps: int = 7,
    warmup: int = 2,
    device="cpu",
    baseline: str | None = None,
) -> dict[str, dict]:
    """Time each variant ``reps`` times, interleaved; returns per-variant stats: median
    and min seconds, all samples, and (if ``baseline``) the median of paired ratios."""
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            variants[name]()
            sync(device)
            if rep >= warmup:
                samples[name].append(time.perf_counter() - t0)
    out = {}
    for name in names:
        s = samples[name]
        out[name] = {"median_s": statistics.median(s), "min_s": min(s), "samples_s": s}
        if baseline is not None:
            ratios = [a / b for a, b in zip(s, samples[baseline])]
            out[name]["ratio"] = statistics.median(ratios)
            out[name]["ratio_of_medians"] = statistics.median(s) / statistics.median(
                samples[baseline]
            )
    return out


def machine() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def write(name: str, result: dict, markdown: str) -> Path:
    """Print ``markdown`` and write ``{OUT_DIR}/{name}.json`` (and ``.md``)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if hasattr(os, "getloadavg"):
        result.setdefault("machine", {})["loadavg_at_end"] = list(os.getloadavg())
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    (OUT_DIR / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\n(wrote {path})", file=sys.stderr)
    return path


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"
