"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "['fft', 'lora0']" in capsys.readouterr().out
    assert (tmp_path / "merged-model" / "config.json").exists()


def test_readme_hugging_face_example_runs(tmp_path, monkeypatch):
    """The "Hugging Face Trainer / TRL / accelerate" block, after the library example
    (whose model it wraps again), on a small ``train_ds``; both of its trainers save a
    model that ``from_pretrained`` loads as the trained one."""
    pytest.importorskip("trl", reason="TRL is not installed (pip install 'molf[hf]')")
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    section = text.index("### Hugging Face Trainer / TRL / accelerate")
    hf = next(b for b in blocks if text.index(b) > section)
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    namespace = {"train_ds": [{"input_ids": x, "labels": x.clone()} for x in ids]}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    exec(compile(hf, "README.md", "exec"), namespace)
    plain = namespace["trainer"]  # the block's plain Trainer, given MoLFAdamW
    plain.train()
    plain.save_model("out/plain")
    for saved in ("out/final", "out/plain"):
        _, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    assert issubclass(namespace["MoLFSFTTrainer"], namespace["SFTTrainer"])
