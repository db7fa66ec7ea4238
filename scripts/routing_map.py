"""The routing map: which expert MoLF's EPD router picks, per module type, as the LoRA
learning-rate ratio, the LoRA expert's rank and the weight decay change.

Training only (40 steps of 32 CounterFact edits from 2,048, cosine, warm-up 0.1;
SmolLM2-135M; evaluation capped at one record), so rank, lr ratio and weight decay are
separated at the authors' recipe point (lr 5e-5, alpha 32, rsLoRA, weight decay 0.1
dense / 0.01 LoRA). Each setting is a ``molf train`` subprocess into
``runs/routing-map/<name>``; a finished one is skipped, so the script continues where
it stopped. Then it writes ``docs/results/routing-map/summary.csv``: per setting and
module type, the FFT expert's share of the decided layer-steps after the warm-up (a
module whose scores are all 0 made no decision and is left out).

    MOLF_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python scripts/routing_map.py
    python scripts/routing_map.py --collect       # only rewrite summary.csv from runs/
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from molf.atomic import write_text_atomic
from molf.routing_log import routing_matrix
from molf.routing_stats import group_modules

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "routing-map"
SUMMARY = ROOT / "docs" / "results" / "routing-map" / "summary.csv"
DENSE_LR = 5e-5
STEPS, WARMUP_RATIO = 40, 0.1

COMMON = [
    "--model", "smollm2-135m", "--task", "fact", "--max-train-samples", "2048",
    "--max-eval-samples", "1", "--no-eval-before", "--no-save-model", "--save-steps", "0",
    "--max-steps", str(STEPS), "--batch-size", "32", "--scheduler", "cosine",
    "--warmup-ratio", str(WARMUP_RATIO), "--use-rslora", "--lr", str(DENSE_LR), "--seed", "0",
]  # fmt: skip


def settings() -> dict[str, dict]:
    """name -> lr ratio, LoRA rank(s) and alpha(s), weight decay (dense / LoRA), score and
    method; the authors' point comes first."""
    out = {}
    authors = dict(wd=0.1, lora_wd=0.01, score="epd", method="molf", alphas="32")
    for ratio in (1, 4, 20):
        for rank in (128, 32):
            out[f"ratio{ratio}-r{rank}"] = dict(authors, ratio=ratio, rank=str(rank))
    out["ratio1-r128-wd0"] = dict(authors, ratio=1, rank="128", wd=0.0, lora_wd=0.0)
    out["ratio20-r128-pfn"] = dict(authors, ratio=20, rank="128", score="pfn")
    # MoLF-E (W frozen, one lr): the authors' equal alphas, then equal scales alpha/sqrt(r)
    molf_e = dict(authors, ratio=1, rank="8,32", method="molf-e")
    out["molf-e-8+32-alpha32+32"] = dict(molf_e, alphas="32,32")
    out["molf-e-8+32-alpha16+32"] = dict(molf_e, alphas="16,32")
    return out


def command(s: dict, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "molf", "train", *COMMON,
        "--data", f"{os.environ['MOLF_DATA_DIR']}/counterfact",
        "--lora-lr", f"{DENSE_LR * s['ratio']:g}", "--lora-ranks", s["rank"],
        "--lora-alphas", s["alphas"], "--score", s["score"], "--method", s["method"],
        "--weight-decay", str(s["wd"]), "--lora-weight-decay", str(s["lora_wd"]),
        "--output-dir", str(out),
    ]  # fmt: skip


def fft_shares(run_dir: Path) -> dict[str, float]:
    """Per module type (and ``all``), the first expert's share of decided layer-steps
    after the warm-up (FFT; for MoLF-E the smaller rank); a module-step whose scores are
    all 0 (lr 0, no gradient) is no decision."""
    matrix = routing_matrix(run_dir)
    fft = 0
    warmup = int(np.ceil(WARMUP_RATIO * STEPS))
    keep = matrix.steps > warmup
    selected, scores = matrix.selected[:, keep], matrix.scores[:, keep]
    decided = ~(np.nan_to_num(scores) == 0).all(-1)  # [modules, steps]
    won = selected[..., fft] & decided
    out = {"all": won.sum() / max(1, decided.sum())}
    for t, rows in group_modules(matrix.modules).items():
        out[t] = won[rows].sum() / max(1, decided[rows].sum())
    return out


def collect() -> None:
    rows = []
    for name, s in settings().items():
        run_dir = RUNS / name
        if not (run_dir / "eval.json").is_file():
            continue
        shares = fft_shares(run_dir)
        first = "fft" if s["method"] == "molf" else "lora0"
        rows.append(
            {"setting": name, **s, "expert": first, **{k: f"{v:.4f}" for k, v in shares.items()}}
        )
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(SUMMARY, text.getvalue())
    write_text_atomic(SUMMARY.with_name("table.md"), markdown(rows))
    plot(rows, SUMMARY.with_name("fft-share.png"))
    print(text.getvalue(), end="")


def markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table (FFT share in %, per module type)."""
    types = [k for k in rows[0] if k.endswith("_proj")]
    head = ["method, score", "lora_lr / lr", "LoRA rank (scale)", "weight decay", "share of",
            "all", *types]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ranks, alphas = r["rank"].split(","), r["alphas"].split(",")
        scales = ", ".join(f"{float(a) / float(k) ** 0.5:.2f}" for k, a in zip(ranks, alphas))
        wd = f"{r['wd']:g} / {r['lora_wd']:g}"
        cells = [f"{r['method']}, {r['score']}", f"{r['ratio']:g}",
                 f"{'+'.join(ranks)} ({scales})", wd, r["expert"]]  # fmt: skip
        cells += [f"{100 * float(r[k]):.1f}" for k in ["all", *types]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: the FFT share per module type, one bar per setting."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from molf.atomic import atomic_file

    types = ["all", *(k for k in rows[0] if k.endswith("_proj"))]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = np.arange(len(types)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(xs, [100 * float(r[t]) for t in types], width, label=r["setting"])
    ax.set_xticks(np.arange(len(types)), types)
    ax.set_ylabel("FFT (MoLF-E: rank-8) share (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("MoLF routing after warm-up: SmolLM2-135M, CounterFact 2,048 edits, 40 steps")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", action="store_true", help="only rewrite summary.csv")
    if not parser.parse_args().collect:
        for name, s in settings().items():
            out = RUNS / name
            if (out / "eval.json").is_file():
                continue
            RUNS.mkdir(parents=True, exist_ok=True)
            print(f"routing map: {name}", flush=True)
            with open(RUNS / f"{name}.log", "w") as log:
                flags = ["--overwrite"] if out.exists() else []
                subprocess.run(command(s, out) + flags, stdout=log, stderr=subprocess.STDOUT)
            collect()
    collect()


if __name__ == "__main__":
    main()
