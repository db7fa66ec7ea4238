"""``final/``: what a finished run leaves behind, in the dtype asked for, and its upload.

The final artifact is a plain Hugging Face model (fft, molf: merged) or a PEFT adapter
(lora, dora, adalora, molf-e), with the tokenizer and a model card. ``--save-dtype``
casts the saved floating-point weights (``bf16`` halves an fp32 model);
``--push-to-hub`` uploads the directory with ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import torch
from torch import nn

from molf.adapter_export import write_peft_adapter
from molf.atomic import atomic_directory
from molf.errors import MolfError
from molf.model import merge_and_unload
from molf.train.args import TrainArgs
from molf.train.methods import method_of
from molf.train.model_card import point_adapter_at

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_CONFIG_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def save_final(
    model: nn.Module, tokenizer, args: TrainArgs, run_dir: Path, base: dict, card: str
) -> Path:
    """``final/``: a merged HF model (fft, molf) or a PEFT adapter (lora, dora, adalora,
    molf-e), with the tokenizer and the model card ``card`` as README.md; ``final/merged``
    too for adapters with --save-merged. An adapter names its base model as
    :func:`adapter_base` says (the offline GGUF file is recorded in ``molf_run.json``).
    Weights are written in ``--save-dtype`` (default: as trained)."""
    final = run_dir / "final"
    with atomic_directory(final) as tmp:
        merged = None
        method = method_of(args)
        if method.peft:
            model.save_pretrained(tmp)
            if args.save_merged:
                merged = model.merge_and_unload()
        elif method.adapter:  # molf-e: its experts exported as one LoRA adapter
            write_peft_adapter(model, tmp)
            if args.save_merged:
                merged = merge_and_unload(model)
        else:  # fft, molf: the final artifact is itself a plain HF model
            (merge_and_unload(model) if method.routed else model).save_pretrained(tmp)
        if merged is not None:
            merged.save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
        tokenizer.save_pretrained(tmp)
        point_adapter_at(tmp, adapter_base(base))
        (tmp / "molf_run.json").write_text(json.dumps({**base, "method": args.method}, indent=2))
        (tmp / "README.md").write_text(card)
        if args.save_dtype is not None:
            for directory in (tmp, tmp / "merged"):
                if directory.is_dir():
                    cast_saved_weights(directory, DTYPES[args.save_dtype])
    return final


def adapter_base(base: dict) -> str:
    """An adapter's ``base_model_name_or_path``, which loads from any directory: the hub
    id when the run knows one, else the model directory as an absolute path (for a GGUF
    file, its dequantized copy in molf's model cache when there is one: a plain HF
    directory)."""
    if base.get("hub_id"):
        return base["hub_id"]
    path = Path(base["base_model"]).expanduser()
    if base.get("gguf_file") and (path / base["gguf_file"]).is_file():
        from molf.train.modeling import model_cache_entry

        entry = model_cache_entry(path / base["gguf_file"])
        if entry.is_dir():
            return os.path.abspath(entry)
    return os.path.abspath(path) if path.exists() else base["base_model"]


def cast_saved_weights(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite every ``*.safetensors`` file in ``directory`` with its floating-point
    tensors in ``dtype`` (integer tensors stay), and record the dtype in config.json and
    the new size in the shard index, so loaders see what the files hold."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {
                k: (t.to(dtype) if t.is_floating_point() else t).contiguous()
                for k in f.keys()
                for t in [f.get_tensor(k)]
            }
        save_file(tensors, str(path), metadata=metadata)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    config = directory / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = _CONFIG_DTYPE[dtype]
        config.write_text(json.dumps(data, indent=2))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2))


class UploadFailed(MolfError):
    """The upload to the Hub failed (network, token, permissions): the model is saved and
    ``molf push RUN`` retries it; exit code 1, not 2, since the run itself is fine."""

    exit_code = 1


def check_repo_id(repo_id: str) -> None:
    """MolfError unless ``repo_id`` is a Hub model repo id ``OWNER/NAME`` (huggingface_hub's
    own rules: letters, digits, ``-``, ``_``, ``.``, at most 96 characters)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    owner, _, name = repo_id.partition("/")
    problem = None
    if not owner or not name or "/" in name:
        problem = "it must be OWNER/NAME"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            problem = str(e).splitlines()[0]
    if problem is not None:
        raise MolfError(
            f"--push-to-hub {repo_id!r}: not a Hub repo id ({problem}); give OWNER/NAME, "
            "e.g. me/smollm2-molf-facts"
        )


def check_hub_token(repo_id: str | None) -> None:
    """Before any work: the repo id is well formed and an upload has a Hub token (checked,
    not validated: that needs the network)."""
    if repo_id is None:
        return
    check_repo_id(repo_id)
    from huggingface_hub import get_token

    if get_token() is None:
        raise MolfError(
            f"--push-to-hub {repo_id}: no Hugging Face token; run hf auth login or set HF_TOKEN"
        )


def push_command(run_dir: Path, repo_id: str) -> str:
    """The command that uploads ``run_dir/final`` again."""
    return f"molf push {shlex.quote(str(run_dir))} --push-to-hub {shlex.quote(repo_id)}"


def push_final(final: Path, repo_id: str) -> str:
    """Upload ``final/`` to the Hub model repo ``repo_id`` (created when missing, with
    the account's default visibility); returns the commit URL. Any failure (no token, a
    refused one, the network) raises :class:`UploadFailed`, one line naming the saved
    model and the ``molf push`` command that retries."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(final),
            repo_id=repo_id,
            commit_message=f"molf: upload {final}",
        )
    except Exception as e:  # HTTP errors, connection errors (httpx), a missing token...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        raise UploadFailed(
            f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {reason}); the "
            f"model is saved in {final}: retry with {push_command(final.parent, repo_id)} "
            "(after hf auth login if the token was refused)"
        ) from None
    return str(getattr(commit, "commit_url", commit))
