"""Fixtures for the train/ tests: a word-level tokenizer for the unit tests of batches
and losses (the model directories and the shared data are in tests/conftest.py)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ["<unk>", "<pad>", "</s>", *(f"w{i}" for i in range(40))]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the words ``w0`` ... ``w39``, with a pad token."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
