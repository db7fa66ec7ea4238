"""``final/``: what a finished run leaves behind, in the dtype asked for, and its upload.

The final artifact is a plain Hugging Face model (fft, molf: merged) or a PEFT adapter
(lora, dora, adalora, molf-e), with the tokenizer and a model card. ``--save-dtype``
casts the saved floating-point weights (``bf16`` halves an fp32 model);
``--push-to-hub`` uploads the directory with ``huggingface_hub``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from molf.atomic import atomic_directory
from molf.errors import MolfError
from molf.model import merge_and_unload, write_peft_adapter
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
    too for adapters with --save-merged. An adapter names its base model by hub id when
    one is known (the offline GGUF file is recorded in ``molf_run.json``). Weights are
    written in ``--save-dtype`` (default: as trained)."""
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
        if base.get("hub_id"):
            point_adapter_at(tmp, base["hub_id"])
        (tmp / "molf_run.json").write_text(json.dumps({**base, "method": args.method}, indent=2))
        (tmp / "README.md").write_text(card)
        if args.save_dtype is not None:
            for directory in (tmp, tmp / "merged"):
                if directory.is_dir():
                    cast_saved_weights(directory, DTYPES[args.save_dtype])
    return final


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


def check_hub_token(repo_id: str | None) -> None:
    """Before any work: an upload needs a Hub token (checked, not validated: that needs
    the network)."""
    if repo_id is None:
        return
    if "/" not in repo_id:
        raise MolfError(f"--push-to-hub {repo_id}: give a repo id as OWNER/NAME")
    from huggingface_hub import get_token

    if get_token() is None:
        raise MolfError(
            f"--push-to-hub {repo_id}: no Hugging Face token; run huggingface-cli login or "
            "set HF_TOKEN"
        )


def push_final(final: Path, repo_id: str) -> str:
    """Upload ``final/`` to the Hub model repo ``repo_id`` (created when missing, with
    the account's default visibility); returns the commit URL. A missing token or a
    failed request raises MolfError naming the saved model and the command to retry."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(final),
            repo_id=repo_id,
            commit_message=f"molf: upload {final}",
        )
    except (HfHubHTTPError, LocalTokenNotFoundError, OSError, ValueError) as e:
        raise MolfError(
            f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the model is saved in {final}: "
            f"log in (huggingface-cli login) and retry with "
            f"huggingface-cli upload {repo_id} {final}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
