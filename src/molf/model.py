"""Wrap a model's linear layers as MoLF layers, merge them back (or save them merged),
export MoLF-E as PEFT."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molf.config import MoLFConfig
from molf.errors import MolfError
from molf.layer import MoLFLinear


def molf_modules(model: nn.Module) -> Iterator[tuple[str, MoLFLinear]]:
    """The MoLF layers of ``model`` with their qualified names, in ``named_modules`` order."""
    for name, module in model.named_modules():
        if isinstance(module, MoLFLinear):
            yield name, module


def _matches(name: str, spec: str | Sequence[str]) -> bool:
    """PEFT's rules: a string is a regex on the whole name, a list holds name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {name for name, m in model.named_modules() if out is not None and m is out}


def find_target_modules(model: nn.Module, config: MoLFConfig) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers that ``config`` targets."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    excluded = _output_layer_names(model) if config.target_modules == "all-linear" else set()
    names = []
    for name in linear:
        if name in excluded or (
            config.exclude_modules is not None and _matches(name, config.exclude_modules)
        ):
            continue
        if config.target_modules == "all-linear" or _matches(name, config.target_modules):
            names.append(name)
    if not names:
        shown = ", ".join(linear[:8]) + (" ..." if len(linear) > 8 else "")
        raise MolfError(
            f"target_modules={config.target_modules!r} (exclude_modules="
            f"{config.exclude_modules!r}) matches no nn.Linear layer; the model's linear "
            f"layers are: {shown or 'none'}"
        )
    return names


def _refuse_shared_targets(model: nn.Module, targets: list[str]) -> None:
    """Refuse a targeted ``nn.Linear`` reachable under two names (one module object held
    by two parents), or two targeted layers sharing a weight: MoLF would wrap it under one
    name only (or fold two experts into one weight), so the merged model would compute
    something else than the trained one."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            names.setdefault(id(module), []).append(name)
    weights: dict[int, str] = {}
    for name in targets:
        module = model.get_submodule(name)
        aliases = [n for n in names[id(module)] if n != name]
        if aliases:
            raise MolfError(
                f"layer '{name}' is also reachable as '{aliases[0]}' (one nn.Linear held by "
                "two parents): MoLF would wrap it under one name only and merging would "
                "change the other; give each parent its own layer, or leave it out of "
                "target_modules"
            )
        other = weights.setdefault(id(module.weight), name)
        if other != name:
            raise MolfError(
                f"layers '{other}' and '{name}' share one weight tensor: merging their "
                "experts would fold both into it; untie them, or leave one out of "
                "target_modules"
            )


def get_molf_model(model: nn.Module, config: MoLFConfig) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by :class:`MoLFLinear`, in place.

    Sets ``requires_grad``: the base weights follow ``config.train_base``, the LoRA
    experts are trained, and every other parameter follows ``config.train_non_linear``.
    The config is kept as ``model.molf_config``. A model with ``save_pretrained`` (a
    Hugging Face model) gets its own, :class:`MergedSavePretrained`, which writes the
    merged model, so every route that saves it (``Trainer.save_model``, its checkpoints,
    ``push_to_hub``, a direct call) writes what ``from_pretrained`` loads. Returns
    ``model``.
    """
    if any(True for _ in molf_modules(model)) or hasattr(model, "molf_config"):
        raise MolfError(
            "the model already holds MoLF layers: wrap a fresh model, or call "
            "merge_and_unload(model) first"
        )
    targets = find_target_modules(model, config)
    _refuse_shared_targets(model, targets)
    for name in targets:
        base = model.get_submodule(name)
        too_big = [r for r in config.lora_ranks if r > min(base.in_features, base.out_features)]
        if too_big:
            raise MolfError(
                f"lora_ranks {too_big} exceed min(d_in, d_out) = "
                f"{min(base.in_features, base.out_features)} of layer '{name}' "
                f"({base.in_features} -> {base.out_features}): use smaller ranks, or "
                "leave that layer out of target_modules"
            )
    for p in model.parameters():
        p.requires_grad_(config.train_non_linear)
    scalings = tuple(config.scalings())
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        for p in base.parameters():
            p.requires_grad_(config.train_base)
        layer = MoLFLinear(
            base,
            config.lora_ranks,
            scalings,
            config.lora_dropout,
            config.lora_grad_path,
            config.fused_weight,
        )
        setattr(parent, child, layer)
    model.molf_config = config
    _install_merged_save(model)
    return model


def parameter_summary(model: nn.Module) -> str:
    """PEFT's ``print_trainable_parameters`` line (trainable / all / %), and for a MoLF
    model the trainable count per expert and the size of the merged model, e.g.
    ``trainable params: 139,397,376 || all params: 139,397,376 || trainable%: 100.00;
    fft expert (W, b of 210 layers) 106,168,320, lora0 (rank 8) 4,882,368, other
    (embeddings, norms, ...) 28,346,688; merged model: 134,515,008 params``."""
    params = list(model.parameters())  # each shared (tied) tensor once
    total = sum(p.numel() for p in params)
    trainable = {id(p): p.numel() for p in params if p.requires_grad}
    line = (
        f"trainable params: {sum(trainable.values()):,} || all params: {total:,} || "
        f"trainable%: {100 * sum(trainable.values()) / max(1, total):.2f}"
    )
    layers = [layer for _, layer in molf_modules(model)]
    if not layers:
        return line
    counted: set[int] = set()

    def count(tensors: list) -> int:
        ids = {id(t) for t in tensors if t is not None and id(t) in trainable} - counted
        counted.update(ids)
        return sum(trainable[i] for i in ids)

    dense = count([t for x in layers for t in (x.base_layer.weight, x.base_layer.bias)])
    parts = [f"fft expert (W, b of {len(layers)} layers) {dense:,}"] if dense else []
    lora_total = 0
    for i, rank in enumerate(layers[0].ranks):
        lora = [t for x in layers for t in (x.lora_A[i], x.lora_B[i])]
        lora_total += sum(t.numel() for t in lora)
        parts.append(f"lora{i} (rank {rank}) {count(lora):,}")
    other = sum(n for i, n in trainable.items() if i not in counted)
    parts.append(f"other (embeddings, norms, ...) {other:,}")
    return f"{line}; {', '.join(parts)}; merged model: {total - lora_total:,} params"


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every LoRA expert into its base weight (in fp32, cast back) and restore the
    plain ``nn.Linear`` layers (and the model's own ``save_pretrained``), so the result
    is a vanilla model. In place; returns it."""
    for name, layer in list(molf_modules(model)):
        with torch.no_grad():
            layer.base_layer.weight.copy_(layer.merged_weight())
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, "molf_config"):
        del model.molf_config
    if isinstance(model.__dict__.get("save_pretrained"), MergedSavePretrained):
        del model.save_pretrained
    return model


# transformers' Trainer names its checkpoints f"{PREFIX_CHECKPOINT_DIR}-{step}" and finds
# them (resume_from_checkpoint=True, load_best_model_at_end) by this name.
TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")
MOLF_CONFIG_NAME = "molf_config.json"


def merged_state(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    keep_experts: bool = False,
) -> dict[str, torch.Tensor]:
    """The merged model's state dict (:func:`merge_and_unload`'s, to the bit), without
    changing ``model``: in ``state_dict`` (default ``model.state_dict()``; e.g. one
    gathered from FSDP) each MoLF layer's tensors (:meth:`~molf.layer.MoLFLinear.state_keys`)
    become ``weight`` (``W' = W + sum_i s_i B_i A_i``) and ``bias`` (on the CPU), in place
    in the key order. With ``keep_experts`` the MoLF tensors stay too, so the dict loads
    into the MoLF model (exactly) and, by name, into the plain model. A layer none of
    whose tensors are there, or whose ``weight`` already is (merged before), is left
    alone."""
    sd = model.state_dict() if state_dict is None else state_dict
    order = {k: i for i, k in enumerate(sd)}
    replace: dict[str, dict[str, torch.Tensor]] = {}  # first key of a layer -> new entries
    drop: set[str] = set()
    found: set[str] = set()  # the keys of every layer found, merged now or before
    for name, layer in molf_modules(model):
        prefix, present = _layer_prefix(layer, name, sd)
        needed = layer.state_keys(prefix).all()
        found.update(present)
        if not present or prefix + "weight" in sd:
            continue
        if len(present) < len(needed):
            raise MolfError(
                f"merged_state_dict: the state dict lacks {sorted(set(needed) - set(present))}"
            )
        replace[min(present, key=order.__getitem__)] = layer.merged_linear_state(sd, prefix)
        if not keep_experts:
            drop.update(needed)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in replace:
            out.update(replace[key])
        if key not in drop:
            out[key] = value
    _refuse_unmerged([key for key in out if key not in found])
    return out


# Module-path segments that wrappers add to ``named_modules()`` but take out of
# ``state_dict()`` keys: activation checkpointing (torch's checkpoint_wrapper, what
# accelerate and FSDP1 insert) and FSDP1's own wrapper.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def _layer_prefix(layer: MoLFLinear, name: str, sd: dict) -> tuple[str, list[str]]:
    """The state-dict prefix of the MoLF layer at module path ``name`` and its tensors'
    keys found in ``sd``: the path as named, else without wrapper segments; ("", [])
    when neither is there."""
    clean = ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)
    for path in dict.fromkeys((name, clean)):
        prefix = f"{path}." if path else ""
        present = [k for k in layer.state_keys(prefix).all() if k in sd]
        if present:
            return prefix, present
    return "", []


EXPERT_KEY = re.compile(r"\.lora_[AB]\.\d+$")  # a MoLF expert's tensor (state_keys)


def _refuse_unmerged(keys: list[str]) -> None:
    """MolfError when one of ``keys`` (those of no MoLF layer found) is an expert
    tensor: its layer is not at that module path, and would be written unmerged."""
    left = [key for key in keys if EXPERT_KEY.search(key)]
    if left:
        raise MolfError(
            f"merged_state_dict: {left[0]} belongs to no MoLF layer of the model by that "
            "name, so its layer cannot be merged; save the model the state dict came from "
            "(unwrapped), or give the state dict its layers' own names"
        )


class MergedSavePretrained:
    """``save_pretrained`` of a model wrapped by :func:`get_molf_model`: the model's own
    ``save_pretrained`` (config, sharding, safetensors, ``push_to_hub``) given the merged
    state dict (:func:`merged_state`), so ``AutoModelForCausalLM.from_pretrained`` loads
    the trained model with no missing key. This is what ``Trainer.save_model`` (any
    Trainer, TRL's included), ``push_to_hub`` and ``accelerator.unwrap_model(model)
    .save_pretrained(d, state_dict=accelerator.get_state_dict(model))`` call.

    ``keep_experts`` (default: whether the directory is named like a Trainer checkpoint,
    ``checkpoint-<step>``) keeps the MoLF tensors in the same file too, with
    ``molf_config.json``: Trainer's ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` read only ``model.safetensors`` into the MoLF model, which
    takes them exactly; a plain ``from_pretrained`` takes the merged weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        save_directory: str | os.PathLike,
        *args: Any,
        state_dict: dict[str, torch.Tensor] | None = None,
        keep_experts: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        model = self.model
        if keep_experts is None:
            keep_experts = TRAINER_CHECKPOINT.fullmatch(Path(save_directory).name) is not None
        state = merged_state(model, state_dict, keep_experts=keep_experts)
        result = type(model).save_pretrained(
            model, save_directory, *args, state_dict=state, **kwargs
        )
        if keep_experts and kwargs.get("is_main_process", True):
            write_molf_config(model.molf_config, Path(save_directory))
        return result


def write_molf_config(config: MoLFConfig, directory: Path) -> None:
    """``molf_config.json`` in ``directory`` (wrap a fresh model with it to resume)."""
    (directory / MOLF_CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))


def _install_merged_save(model: nn.Module) -> None:
    """Give ``model`` a :class:`MergedSavePretrained` (when its class has
    ``save_pretrained``) and have ``load_state_dict`` not report the merged weights of a
    checkpoint it saved as unexpected."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = MergedSavePretrained(model)
    model.register_load_state_dict_post_hook(_ignore_merged_keys)


def _ignore_merged_keys(model: nn.Module, incompatible: Any) -> None:
    """Drop the merged ``weight``/``bias`` of each MoLF layer from the unexpected keys of
    a load that also found the layer's MoLF tensors (a checkpoint kept both)."""
    merged = set()
    for name, layer in molf_modules(model):
        prefix = f"{name}." if name else ""
        if layer.state_keys(prefix).weight not in incompatible.missing_keys:
            merged.update((prefix + "weight", prefix + "bias"))
    incompatible.unexpected_keys[:] = [k for k in incompatible.unexpected_keys if k not in merged]
