"""Fixtures for end-to-end runs of the CLI on real (tiny) models and the shared data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def stories(shared_data) -> Path:
    return shared_data / "models" / "stories260k"


@pytest.fixture
def tiny_dir(tmp_path, stories):
    """Save a tiny random model of an architecture, with stories260k's tokenizer."""

    def make(arch: str) -> Path:
        from helpers import tiny_model

        out = tmp_path / f"tiny-{arch}"
        model = tiny_model(arch, vocab_size=520)  # room for a pad token some classes add
        model.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
            shutil.copy(stories / name, out / name)
        return out

    return make


def fact_file(shared_data) -> str:
    return str(shared_data / "counterfact" / "counterfact-val.json")
