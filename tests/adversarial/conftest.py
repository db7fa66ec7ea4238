"""Fixtures for the adversarial pass: real runs of a tiny model next to a user's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.cli import main

QUICK = [
    "--task", "fact", "--max-train-samples", "8", "--max-eval-samples", "4",
    "--batch-size", "4", "--eval-batch-size", "8", "--lora-ranks", "4", "--lora-alphas", "8",
    "--lr", "1e-3", "--max-steps", "2", "--no-eval-before",
]  # fmt: skip


def train_args(out: Path, model: Path, *extra: str) -> list[str]:
    """``molf train`` of a two-step run of ``model`` on the built-in edits into ``out``."""
    return ["train", "--output-dir", str(out), "--model", str(model), "--data", "builtin",
            *QUICK, *extra]  # fmt: skip


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show nothing changed)."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def molf_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished molf run (routing logged), shared by the module's tests (read only)."""
    out = tmp_path_factory.mktemp("adversarial") / "run"
    assert main(train_args(out, tiny_model_dir, "--method", "molf")) == 0
    return out
