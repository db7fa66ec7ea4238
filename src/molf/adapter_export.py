"""A MoLF-Efficient model as a plain PEFT LoRA adapter (:func:`export_peft_adapter`):
each layer's experts stacked into one LoRA of rank ``R = sum_i r_i``
(:meth:`~molf.layer.MoLFLinear.stacked_lora`), with the trained modules outside the
MoLF layers saved whole, so ``PeftModel.from_pretrained`` reproduces the model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from molf.atomic import atomic_directory
from molf.config import MoLFConfig
from molf.errors import MolfError
from molf.layer import MoLFLinear
from molf.model import molf_modules, write_molf_config


def _trained_non_molf_modules(model: nn.Module) -> list[str]:
    """Names of the modules outside MoLF layers that own a trainable parameter."""
    inside = {n for n, _ in molf_modules(model)}
    owners = []
    for name, module in model.named_modules():
        if any(name == i or name.startswith(i + ".") for i in inside):
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            owners.append(name)
    return owners


def export_peft_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a MoLF-E model as a PEFT LoRA adapter that reproduces its outputs.

    The experts of a layer become one LoRA of rank ``R = sum_i r_i``:
    ``A = [A_0; A_1; ...]`` (R x d_in), ``B = [s_0 B_0, s_1 B_1, ...]`` (d_out x R),
    with ``lora_alpha = R`` and no rsLoRA, so PEFT's scaling is 1 and
    ``B A = sum_i s_i B_i A_i``. Trained parameters outside MoLF layers (embeddings,
    norms) go into ``modules_to_save``. Load with ``PeftModel.from_pretrained(base, path)``.
    Written to a temporary directory first, then renamed into place
    (:func:`write_peft_adapter` writes into a directory the caller provides).
    """
    _adapter_config(model)  # refuse before anything is written
    with atomic_directory(Path(path)) as tmp:
        write_peft_adapter(model, tmp)


def _adapter_config(model: nn.Module) -> MoLFConfig:
    """The MoLF config of a model that a LoRA adapter can reproduce, or MolfError."""
    config: MoLFConfig | None = getattr(model, "molf_config", None)
    if config is None:
        raise MolfError("export_peft_adapter needs a model wrapped by get_molf_model")
    if config.train_base:
        raise MolfError(
            "export_peft_adapter needs a MoLF-Efficient model (train_base=False): this "
            "model's base weights were trained, so a LoRA adapter cannot reproduce it; "
            "use merge_and_unload(model) and save the merged model instead"
        )
    return config


def write_peft_adapter(model: nn.Module, directory: Path) -> None:
    """:func:`export_peft_adapter`'s files, written into the existing ``directory`` (for
    a caller that already writes a whole directory atomically, such as ``final/``)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = _adapter_config(model)
    layers = list(molf_modules(model))
    rank = sum(config.lora_ranks)
    to_save = _trained_non_molf_modules(model)
    tensors = _adapter_tensors(model, layers, to_save)
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        lora_dropout=config.lora_dropout,
        target_modules=[name for name, _ in layers],
        modules_to_save=to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=_base_model_name(model),
    )
    peft_config.save_pretrained(directory)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    write_molf_config(config, directory)


def _base_model_name(model: nn.Module) -> str | None:
    """The model's ``_name_or_path``, a local directory made absolute (so the adapter
    loads from any working directory)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return os.path.abspath(name) if name and os.path.isdir(name) else name


def _adapter_tensors(
    model: nn.Module, layers: list[tuple[str, MoLFLinear]], to_save: list[str]
) -> dict[str, torch.Tensor]:
    """The adapter's tensors: each layer's experts as one LoRA
    (:meth:`~molf.layer.MoLFLinear.stacked_lora`) and the parameters of the ``to_save``
    modules, by PEFT name."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        a, b = layer.stacked_lora()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    saved: set[int] = set()
    for name in to_save:
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            # Tied weights (embeddings = lm_head) are one tensor under two names;
            # safetensors stores each name's own copy, and loading gives both the values.
            t = p.detach().contiguous()
            tensors[f"base_model.model.{name}.{pname}"] = t.clone() if id(p) in saved else t
            saved.add(id(p))
    return tensors
