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
from molf.report.modules import group_modules
from molf.report.routing import routing_matrix

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "routing-map"
SUMMARY = ROOT / "docs" / "results" / "routing-map" / "summary.csv"
DENSE_LR = 5e-5
STEPS, WARMUP_RATIO = 40, 0.1

COMMON = [
    "--model", "smollm2-135m", "--task", "fact", "--max-train-samples", "2048",
    "--max-eval-samples", "1", "--no-eval-before", "--no-save-model", "--save-steps", "0",
    "--method", "molf", "--max-steps", str(STEPS), "--batch-size", "32",
    "--scheduler", "cosine", "--warmup-ratio", str(WARMUP_RATIO), "--lora-alphas", "32",
    "--use-rslora", "--lr", str(DENSE_LR), "--seed", "0",
]  # fmt: skip


def settings() -> dict[str, dict[str, float]]:
    """name -> (lr ratio, LoRA rank, dense wd, LoRA wd); the authors' point comes first."""
    out = {}
    for ratio in (1, 4, 20):
        for rank in (128, 32):
            out[f"ratio{ratio}-r{rank}"] = dict(ratio=ratio, rank=rank, wd=0.1, lora_wd=0.01)
    out["ratio1-r128-wd0"] = dict(ratio=1, rank=128, wd=0.0, lora_wd=0.0)
    return out


def command(s: dict[str, float], out: Path) -> list[str]:
    return [
        sys.executable, "-m", "molf", "train", *COMMON,
        "--data", f"{os.environ['MOLF_DATA_DIR']}/counterfact",
        "--lora-lr", f"{DENSE_LR * s['ratio']:g}", "--lora-ranks", str(int(s["rank"])),
        "--weight-decay", str(s["wd"]), "--lora-weight-decay", str(s["lora_wd"]),
        "--output-dir", str(out),
    ]  # fmt: skip


def fft_shares(run_dir: Path) -> dict[str, float]:
    """Per module type (and ``all``), the FFT expert's share of decided layer-steps after
    the warm-up; a module-step whose scores are all 0 (lr 0, no gradient) is no decision."""
    matrix = routing_matrix(run_dir)
    fft = matrix.experts.index("fft")
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
        rows.append({"setting": name, **s, **{k: f"{v:.4f}" for k, v in shares.items()}})
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(SUMMARY, text.getvalue())
    print(text.getvalue(), end="")


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
