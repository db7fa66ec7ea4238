"""Fixtures for the task tests: a real tiny model (stories260k, from the shared data), a
word tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """One thread for these tests: the models are tiny, and a second thread waiting
    on a busy core slows each forward pass a hundredfold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(stories: Path):
    """(model, tokenizer) of the real pretrained stories260k Llama, loaded offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = stories
    model = AutoModelForCausalLM.from_pretrained(path)
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture
def word_tokenizer():
    """A real fast tokenizer over a tiny word vocabulary: BOS on prompts, EOS known, no pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
