"""The merged model's state dict, computed without merging the model: what
``save_model()`` writes (the plain model) and what checkpoints hold beside the MoLF
tensors (so a plain ``from_pretrained`` loads the trained model)."""

from __future__ import annotations

import torch
from torch import nn

from molf.errors import MolfError
from molf.integrations.hf.discovery import find_molf_model
from molf.layer import MoLFLinear
from molf.model import molf_modules


def merged_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    keep_experts: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict of the merged model (what ``merge_and_unload`` would give, to the
    bit), computed without changing ``model``.

    ``state_dict`` (default ``model.state_dict()``) is a full state dict of the MoLF
    model, e.g. one gathered from FSDP; each MoLF layer's tensors (its
    :meth:`~molf.layer.MoLFLinear.state_keys`) become ``weight`` (its
    :meth:`~molf.layer.MoLFLinear.merged_weight`) and ``bias``, in place in the key
    order; every other entry is kept as it is. The merged tensors are on the CPU (a copy
    of the targeted weights would otherwise be held on the accelerator while saving).
    With ``keep_experts``, the MoLF tensors stay too, so the dict both loads into the
    MoLF model (which ignores ``weight`` and ``bias`` as unexpected keys) and, by name,
    into the plain model. A layer none of whose tensors are in ``state_dict`` is left
    alone.
    """
    molf_model = find_molf_model(model)
    if molf_model is None:
        raise MolfError("merged_state_dict needs a model wrapped by get_molf_model")
    sd = molf_model.state_dict() if state_dict is None else state_dict
    order = {k: i for i, k in enumerate(sd)}
    replace: dict[str, dict[str, torch.Tensor]] = {}  # first key of a layer -> new entries
    drop: set[str] = set()
    for name, layer in molf_modules(molf_model):
        prefix = f"{name}." if name else ""
        needed = layer.state_keys(prefix).all()
        present = [k for k in needed if k in sd]
        if not present:
            continue
        if len(present) < len(needed):
            missing = sorted(set(needed) - set(present))
            raise MolfError(f"merged_state_dict: the state dict lacks {missing}")
        replace[min(present, key=order.__getitem__)] = _merged_layer(
            layer, sd, prefix, keep_experts
        )
        if not keep_experts:
            drop.update(needed)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in replace:
            out.update(replace[key])
        if key not in drop:
            out[key] = value
    return out


def _merged_layer(
    layer: MoLFLinear, sd: dict[str, torch.Tensor], prefix: str, keep_experts: bool
) -> dict[str, torch.Tensor]:
    """The merged ``nn.Linear``'s entries for ``layer``, whose tensors ``sd`` holds under
    ``prefix``: ``weight`` (:meth:`~molf.layer.MoLFLinear.merged_weight`) and ``bias``,
    on the CPU; the bias is a copy when the experts (and so its MoLF entry) stay."""
    new = {prefix + "weight": layer.merged_weight(sd, prefix).to("cpu")}
    bias_key = layer.state_keys(prefix).bias
    if bias_key is not None:
        bias = sd[bias_key].detach()
        new[prefix + "bias"] = bias.to("cpu", copy=True) if keep_experts else bias
    return new
