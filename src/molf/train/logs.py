"""What a run writes besides checkpoints: JSONL logs, trackers and the results table."""

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
from molf.report.modules import type_shares

SUMMARY_MIN_SHARE = 0.10  # module types below this share are folded into "others"
SUMMARY_MAX_TYPES = 4  # and so are those past the first four


class RoutingTally:
    """How often each expert won each module over some steps, counted on the host from
    the optimizer's :class:`Routing` (``selected``, already copied for the log)."""

    def __init__(self) -> None:
        self.modules: list[str] = []
        self.experts: list[str] = []
        self.counts: np.ndarray | None = None  # int [modules, experts]
        self.steps = 0
        self.first_step = self.last_step = 0

    def add(self, step: int, routing: Routing, selected: torch.Tensor) -> None:
        """Count one step; ``selected`` is ``routing.selected`` on the CPU."""
        if self.counts is None:
            self.modules, self.experts = list(routing.modules), list(routing.experts)
            self.counts = np.zeros((len(self.modules), len(self.experts)), dtype=np.int64)
            self.first_step = step
        self.counts += selected.numpy()
        self.steps += 1
        self.last_step = step

    def expert_shares(self) -> np.ndarray:
        """float [experts]: the share of layer-steps each expert was selected in."""
        assert self.counts is not None
        return self.counts.sum(0) / max(1, self.steps * len(self.modules))

    def scalars(self) -> dict[str, float]:
        """Tracker scalars: ``routing/<expert>`` and ``routing/<type>/<expert>`` shares."""
        if self.counts is None or not self.steps:
            return {}
        out = {f"routing/{e}": float(v) for e, v in zip(self.experts, self.expert_shares())}
        for t, shares in type_shares(self.counts, self.modules, self.steps).items():
            out.update({f"routing/{t}/{e}": float(v) for e, v in zip(self.experts, shares)})
        return out

    def summary(self) -> str:
        """One line, e.g. ``routing, steps 1-60: lora0 88%, fft 12% of layer-steps;
        fft: down_proj 41%, k_proj 30%, others < 10%``: every expert but the most chosen
        one, with the module types where it is chosen most."""
        if self.counts is None or not self.steps:
            return "routing: no steps yet"
        overall = self.expert_shares()
        by_type = type_shares(self.counts, self.modules, self.steps)
        ranked = sorted(range(len(self.experts)), key=lambda e: -overall[e])
        total = ", ".join(f"{self.experts[e]} {overall[e]:.0%}" for e in ranked)
        steps = (
            f"step {self.last_step}"
            if self.first_step == self.last_step
            else f"steps {self.first_step}-{self.last_step}"
        )
        clauses = []
        for e in ranked[1:]:
            where = sorted(((v[e], t) for t, v in by_type.items()), key=lambda x: -x[0])
            shown = [(v, t) for v, t in where if v >= SUMMARY_MIN_SHARE][:SUMMARY_MAX_TYPES]
            big = [f"{t} {v:.0%}" for v, t in shown]
            if len(shown) < len(where):
                rest, floor = where[len(shown)][0], SUMMARY_MIN_SHARE
                bound = f"<= {rest:.0%}" if rest >= floor else f"< {floor:.0%}"
                big.append(f"{'others' if big else 'all'} {bound}")
            clauses.append(f"{self.experts[e]}: {', '.join(big)}")
        return f"routing, {steps}: {total} of layer-steps" + "".join(f"; {c}" for c in clauses)


class RunLogger:
    """Appends ``train_log.jsonl`` and ``routing.jsonl``; forwards scalars to trackers."""

    def __init__(
        self, run_dir: Path, report_to: str, config: dict[str, Any], enabled: bool = True
    ) -> None:
        self.run_dir, self.enabled, self._config = run_dir, enabled, config
        self._tracker: Any = None
        self._routing_header_written = (run_dir / "routing.jsonl").exists()
        self.routing_total = RoutingTally()  # the steps of this process, for the summary
        self.routing_window = RoutingTally()  # since the last log_train, for trackers
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
        claim(self.run_dir / name)
        with open(self.run_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def log_train(self, record: dict[str, Any]) -> None:
        """Append the record to ``train_log.jsonl``; trackers get its numbers as
        ``train/<key>`` and the routing shares since the last call as ``routing/...``."""
        if not self.enabled:
            return
        self._append("train_log.jsonl", record)
        scalars = {
            f"train/{k}": v for k, v in record.items() if k != "step" and isinstance(v, float)
        }
        scalars.update(self.routing_window.scalars())
        self.routing_window = RoutingTally()
        if self._tracker is not None and hasattr(self._tracker, "add_scalar"):
            for k, v in scalars.items():
                self._tracker.add_scalar(k, v, record["step"])
        elif self._tracker is not None:
            self._tracker.log(scalars, step=record["step"])

    def log_routing(self, step: int, routing: Routing) -> None:
        """One line per optimizer step: each module's winners and its scores (3 digits)."""
        if not self.enabled:
            return
        if not self._routing_header_written:
            self._append("routing.jsonl", {"modules": routing.modules, "experts": routing.experts})
            self._routing_header_written = True
        selected = routing.selected.cpu()
        scores = routing.scores.float().cpu()
        self.routing_total.add(step, routing, selected)
        self.routing_window.add(step, routing, selected)
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
                kept = [x for x in _complete_lines(path) if json.loads(x).get("step", 0) <= step]
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


def _complete_lines(path: Path) -> list[str]:
    """A log's lines, without a torn last line (a kill mid-write): it is logged again
    when the step is redone."""
    lines = path.read_text().splitlines(keepends=True)
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            print(f"[molf] warning: {path}: dropping a torn last line", file=sys.stderr)
            lines.pop()
    return lines


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
