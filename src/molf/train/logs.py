"""What a run writes besides checkpoints: JSONL logs, trackers and the results table."""

from __future__ import annotations

import csv
import io
import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from molf.errors import MolfError
from molf.optim import Routing
from molf.train.checkpoint import write_text_atomic


class RunLogger:
    """Appends ``train_log.jsonl`` and ``routing.jsonl``; forwards scalars to trackers."""

    def __init__(
        self, run_dir: Path, report_to: str, config: dict[str, Any], enabled: bool = True
    ) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self._tracker: Any = None
        self._routing_header_written = (run_dir / "routing.jsonl").exists()
        if not enabled or report_to == "none":
            return
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MolfError(
                    "--report-to tensorboard: install it with pip install tensorboard"
                ) from None
            self._tracker = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise MolfError("--report-to wandb: install it with pip install wandb") from None
            self._tracker = wandb.init(project="molf", dir=str(run_dir), config=config)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_train(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._append("train_log.jsonl", record)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, float)}
        if self._tracker is not None and hasattr(self._tracker, "add_scalar"):
            for k, v in scalars.items():
                self._tracker.add_scalar(f"train/{k}", v, record["step"])
        elif self._tracker is not None:
            self._tracker.log({f"train/{k}": v for k, v in scalars.items()}, step=record["step"])

    def log_routing(self, step: int, routing: Routing) -> None:
        """One line per optimizer step: each module's winners and its scores (3 digits)."""
        if not self.enabled:
            return
        if not self._routing_header_written:
            self._append("routing.jsonl", {"modules": routing.modules, "experts": routing.experts})
            self._routing_header_written = True
        selected = routing.selected.cpu()
        scores = routing.scores.float().cpu()
        self._append(
            "routing.jsonl",
            {
                "step": step,
                "winners": [row.nonzero().flatten().tolist() for row in selected],
                "scores": [[float(f"{s:.3g}") for s in row] for row in scores.tolist()],
            },
        )

    def truncate(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run logs them again)."""
        if not self.enabled:
            return
        for name in ("train_log.jsonl", "routing.jsonl"):
            path = self.run_dir / name
            if path.exists():
                lines = path.read_text().splitlines(keepends=True)
                kept = [x for x in lines if json.loads(x).get("step", 0) <= step]
                write_text_atomic(path, "".join(kept))

    def close(self) -> None:
        if self._tracker is not None:
            (self._tracker.close if hasattr(self._tracker, "close") else self._tracker.finish)()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / (2**20 if sys.platform == "darwin" else 2**10)


RESULT_COLUMNS = [
    "output_dir",
    "model",
    "task",
    "method",
    "lr",
    "lora_lr",
    "lora_ranks",
    "lora_alphas",
    "top_k",
    "score",
    "steps",
    "batch_size",
    "grad_accum",
    "seed",
    "primary_metric",
    "before",
    "after",
    "metrics_after",
    "train_seconds",
    "peak_memory_mb",
]


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Add one row to ``results.csv`` (rewritten atomically; the header is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    if not existing:
        writer.writeheader()
    writer.writerow(row)
    write_text_atomic(path, existing + out.getvalue())
