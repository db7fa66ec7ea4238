"""What a run writes besides checkpoints: JSONL logs, trackers and the results table; and
its console lines (:func:`say`)."""

from __future__ import annotations

import csv
import io
import json
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molf.atomic import write_text_atomic
from molf.errors import MolfError
from molf.optim import Routing
from molf.ownership import claim, locked_dir
from molf.routing_stats import RoutingCounts


def say(message: str, enabled: bool = True) -> None:
    """Print one ``[molf]`` console line (``enabled`` False: say nothing, e.g. not rank 0)."""
    if enabled:
        print(f"[molf] {message}", flush=True)


def format_metrics(metrics: dict[str, float]) -> str:
    """``name=value`` pairs for the console, four decimals."""
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


class RunLogger:
    """Appends ``train_log.jsonl`` and ``routing.jsonl``; forwards scalars to trackers."""

    def __init__(
        self, run_dir: Path, report_to: str, config: dict[str, Any], enabled: bool = True
    ) -> None:
        self.run_dir, self.enabled, self._config = run_dir, enabled, config
        self._tracker: Any = None
        self._routing_header_written = (run_dir / "routing.jsonl").exists()
        self.routing_total: RoutingCounts | None = None  # this process's steps: the summary
        self.routing_window: RoutingCounts | None = None  # since the last log_train: trackers
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
            self._tracker = wandb.init(
                project=config.get("wandb_project") or "molf",
                name=config.get("wandb_run_name"),
                dir=str(run_dir),
                config=config,
            )

    def _append(self, name: str, record: dict[str, Any]) -> None:
        path = self.run_dir / name
        claim(path)
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk fails the write or the close: name the file
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror, str(path)) from e

    def log_train(self, record: dict[str, Any]) -> None:
        """Append the record to ``train_log.jsonl``; trackers get its numbers as
        ``train/<key>`` (``eval_<name>``: ``eval/<name>``) and the routing shares since
        the last call as ``routing/...``."""
        if not self.enabled:
            return
        self._append("train_log.jsonl", record)
        scalars = {
            f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}": v
            for k, v in record.items()
            if k != "step" and isinstance(v, float)
        }
        if self.routing_window is not None:
            scalars.update(self.routing_window.scalars())
            self.routing_window = RoutingCounts(
                self.routing_window.modules, self.routing_window.experts
            )
        if self._tracker is not None and hasattr(self._tracker, "add_scalar"):
            for k, v in scalars.items():
                self._tracker.add_scalar(k, v, record["step"])
        elif self._tracker is not None:
            self._tracker.log(scalars, step=record["step"])

    def log_routing(self, step: int, routing: Routing) -> tuple[np.ndarray, int]:
        """One line per optimizer step: each module's winners, its scores (3 digits) and,
        as ``ties``, the modules that made no decision (all scores 0). Returns the step's
        wins per expert over its decided modules, and their number (rank 0 only: other
        ranks copy nothing to the host and return no wins)."""
        if not self.enabled:
            return np.zeros(len(routing.experts), dtype=np.int64), 0
        selected = routing.selected.cpu().numpy()
        scores = routing.scores.float().cpu().numpy()
        if self.routing_total is None:
            self.routing_total = RoutingCounts(list(routing.modules), list(routing.experts))
            self.routing_window = RoutingCounts(list(routing.modules), list(routing.experts))
        made = self.routing_total.add(step, selected, scores)
        self.routing_window.add(step, selected, scores)
        if not self._routing_header_written:
            self._append("routing.jsonl", {"modules": routing.modules, "experts": routing.experts})
            self._routing_header_written = True
        record = {
            "step": step,
            "winners": [row.nonzero()[0].tolist() for row in selected],
            "scores": [[float(f"{s:.3g}") for s in row] for row in scores.tolist()],
        }
        if not made.all():
            record["ties"] = (~made).nonzero()[0].tolist()
        self._append("routing.jsonl", record)
        return (selected * made[:, None]).sum(0), int(made.sum())

    def truncate(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run logs them again)."""
        if not self.enabled:
            return
        for name in ("train_log.jsonl", "routing.jsonl"):
            path = self.run_dir / name
            if path.exists():
                kept = [x for x, rec in _complete_lines(path) if rec.get("step", 0) <= step]
                write_text_atomic(path, "".join(kept))

    def log_results(self, results: dict[str, Any]) -> None:
        """Metrics before and after training, with the resolved settings as hyperparameters
        (TensorBoard's HParams tab; W&B's run summary)."""
        metrics = {
            f"{stage}/{name}": float(value)
            for stage in ("before", "after", "baselines")
            for name, value in results.get(stage, {}).items()
        }
        if self._tracker is None or not metrics:
            return
        if hasattr(self._tracker, "add_hparams"):
            hparams = {
                k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                for k, v in self._config.items()
                if v is not None
            }
            self._tracker.add_hparams(hparams, metrics, run_name=".")
        else:
            self._tracker.summary.update(metrics)

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


def parse_record(raw: bytes) -> dict[str, Any]:
    """One JSONL line as its JSON object; ValueError saying what is wrong with it (not
    UTF-8, not JSON, not an object) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deep)") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    return record


def _complete_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """A log's lines (each ending in a newline) with their records, without a torn last
    line (a kill mid-write): it is logged again when the step is redone. Any other line
    that is not a JSON object is a MolfError naming ``path:line``."""
    lines = path.read_bytes().splitlines(keepends=True)
    last = max((i for i, x in enumerate(lines, 1) if x.strip()), default=0)
    out = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = parse_record(raw)
        except ValueError as e:
            if number == last:
                warning = f"[molf] warning: {path}:{number}: dropping a torn last line ({e})"
                print(warning, file=sys.stderr)
                break
            raise MolfError(
                f"{path}:{number}: {e}; this log line is damaged: delete it (the report "
                "then misses that step) and run again"
            ) from None
        out.append((raw.decode("utf-8").rstrip("\r\n") + "\n", record))
    return out


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Add one row to ``results.csv`` (rewritten atomically; the header is kept). A
    results.csv that molf did not write is refused. Runs sharing the file take turns
    through an exclusive lock on its directory."""
    claim(
        path,
        f"molf appends each run's row to {path.name} beside its --output-dir: move that "
        "file away or put the run in another directory",
    )
    with locked_dir(path.parent):
        existing = path.read_text() if path.exists() else ""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        if not existing:
            writer.writeheader()
        writer.writerow(row)
        write_text_atomic(path, existing + out.getvalue())
