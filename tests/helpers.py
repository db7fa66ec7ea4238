"""Helpers the tests share (import them: ``from helpers import tiny_model``): tiny real
Hugging Face models, a tokenizer trained in-process, and a saved model directory built
from both (what ``molf train --model DIR`` reads), so no test needs a download or the
shared data to run a real ``molf train``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of a real HF architecture."""
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()  # q/k/v carry biases
    if arch == "gemma3":
        kw.setdefault("head_dim", 8)
        kw.setdefault("sliding_window", 16)
        return Gemma3ForCausalLM(Gemma3TextConfig(**kw)).eval()
    raise ValueError(arch)


# --- a tokenizer and a model directory, built in-process -----------------------------

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Llama's unk, bos and eos
TOKENIZER_VOCAB = 384  # the 256 bytes, the 3 specials and about 125 merges

_WORDS = """
the a an of in on to is was are by for with from and or as at it its his her their
capital city country river language name born plays play made owned works work job
france paris berlin japan tokyo lima italy rome spain madrid london england english
french german spanish italian planet sun moon mars jupiter earth water tom has cats
dog cat sat mat ran say said tree one two three four five six seven eight nine ten
how many what which who where when select from where count table create int text
question answer patient doctor disease drug heart blood option correct because
""".split()


def _corpus() -> list[str]:
    """Lines to train the tokenizer on: the built-in fact edits (the data most tests
    train on) and a few hundred common words, so those texts take few tokens."""
    from molf.tasks.fact_builtin import BUILTIN_FACTS

    lines = [" ".join(fact) for fact in BUILTIN_FACTS]
    lines += [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 12)]
    return lines * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on a small corpus (no download): every
    text round-trips through it, unknown words as bytes. It adds ``<s>`` before a text
    and knows ``</s>``, like Llama's, and has no pad token (molf sets one, as for
    most base models' tokenizers) and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_model_dir(
    out: Path, arch: str = "llama", tokenizer: PreTrainedTokenizerFast | None = None
) -> Path:
    """Save a tiny random ``arch`` model with ``tokenizer`` (default: a fresh
    :func:`tiny_tokenizer`) into ``out``, as a Hub model directory would hold them.

    Its embeddings are tied (as in stories260k and most small LMs), its weights are about
    as large as a trained model's (bf16 rounds small updates away as it would there), its
    config names the tokenizer's bos and eos, and it has room for 256 positions (a fact
    prompt with its answer takes about 20 tokens; ``molf train`` cuts its default
    --max-length 512 to the model's positions)."""
    tokenizer = tokenizer or tiny_tokenizer()
    # room for a pad token some tokenizer classes add (Qwen2's <|endoftext|>), rounded up
    vocab = -(-(len(tokenizer) + 1) // 16) * 16
    model = tiny_model(
        arch,
        vocab_size=vocab,
        tie_word_embeddings=True,
        initializer_range=0.1,  # weights of a trained small LM's size (stories260k's ~0.1)
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_fact_file(path: Path, n: int) -> Path:
    """``n`` made-up CounterFact-style edits (the fields of the shared
    counterfact-val.json) as one JSON file: more edits than the 24 built-in ones."""
    records = [
        {
            "case_id": i,
            "prompt": f"The capital of country {i} is",
            "target_new": f"city {i + 1}",
            "subject": f"country {i}",
            "ground_truth": f"city {i}",
            "rephrase_prompt": f"Country {i} has its capital in",
            "locality_prompt": f"The river of country {i} is",
            "locality_ground_truth": f"river {i}",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


def token_rows(n: int = 16, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """``n`` rows of random token ids (labels = inputs) over :data:`TINY`'s vocabulary:
    a Trainer dataset for the tiny models."""
    ids = torch.randint(0, TINY["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def cpu_training_arguments(out: Path | str, **overrides):
    """TrainingArguments for a few quiet CPU steps of a tiny model (``overrides`` win)."""
    from transformers import TrainingArguments

    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_strategy="no",
        logging_steps=100,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**kw, **overrides})
