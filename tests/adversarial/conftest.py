"""Fixtures for the adversarial pass: real runs on stories260k next to a user's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.cli import main

QUICK = [
    "--task", "fact", "--max-train-samples", "8", "--max-eval-samples", "4",
    "--batch-size", "4", "--eval-batch-size", "8", "--lora-ranks", "4", "--lora-alphas", "8",
    "--lr", "1e-3", "--max-steps", "2", "--no-eval-before",
]  # fmt: skip


def train_args(out: Path, shared_data: Path, *extra: str) -> list[str]:
    """``molf train`` of a two-step run on stories260k into ``out``."""
    model = shared_data / "models" / "stories260k"
    data = shared_data / "counterfact" / "counterfact-val.json"
    return ["train", "--output-dir", str(out), "--model", str(model), "--data", str(data),
            *QUICK, *extra]  # fmt: skip


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show nothing changed)."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def molf_run(tmp_path_factory, shared_data) -> Path:
    """A finished molf run (routing logged), shared by the module's tests (read only)."""
    out = tmp_path_factory.mktemp("adversarial") / "run"
    assert main(train_args(out, shared_data, "--method", "molf")) == 0
    return out
