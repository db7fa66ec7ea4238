"""Fixtures for the train/ tests: a word-level tokenizer for the unit tests of batches
and losses, and the small `molf train` run test_cli.py and test_job.py share (the model
directories and the shared data are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from molf.cli import main

WORDS = ["<unk>", "<pad>", "</s>", *(f"w{i}" for i in range(40))]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the words ``w0`` ... ``w39``, with a pad token."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


QUICK = [
    "--max-train-samples", "8", "--max-eval-samples", "6", "--batch-size", "4",
    "--eval-batch-size", "8", "--max-new-tokens", "4", "--lora-ranks", "4,8",
    "--lora-alphas", "8,8", "--lr", "1e-3",
]  # fmt: skip


def train_run(tmp_path: Path, name: str, *extra: str) -> Path:
    """`molf train` into ``tmp_path/runs/name`` with QUICK and ``extra``; its run dir."""
    out = tmp_path / "runs" / name
    assert main(["train", "--output-dir", str(out), *QUICK, *extra]) == 0
    return out
