"""MoLFAdamW's parameter groups, and each expert tensor's cell in the routing table.

Routing works on a ``[modules x experts]`` table: module ``m`` (the ``m``-th MoLF
layer) and expert ``e`` (the FFT expert first when the base trains, then the LoRA
experts) make cell ``m * E + e``. :func:`param_groups` builds the groups from the
model and says which cell each expert tensor scores into; :func:`layout` turns the
cells of the tensors a step works on into the :class:`Layout` the routed step reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from molf.optim.functional import Layout


def param_groups(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    lr: float,
    lora_lr: float,
    weight_decay: float,
    lora_weight_decay: float,
) -> tuple[list[dict], dict[int, int]]:
    """The parameter groups (``fft``, ``fft_bias``, ``lora0``, ..., ``other``,
    ``other_no_decay``: see :class:`~molf.optim.MoLFAdamW`), the empty ones left out,
    and, for every expert tensor, its cell ``m * E + e`` (by ``id``)."""
    config = model.molf_config
    num_lora, fft = len(config.lora_ranks), int(config.train_base)
    num_e = len(config.expert_names)
    cells: dict[int, int] = {}
    buckets: dict[str, list[Tensor]] = {
        k: [] for k in ["fft", "fft_bias", *[f"lora{i}" for i in range(num_lora)]]
    }
    for m, (_, layer) in enumerate(layers):
        base = layer.base_layer
        for key, p in (("fft", base.weight), ("fft_bias", base.bias)):
            if p is not None and p.requires_grad and fft:
                buckets[key].append(p)
                cells[id(p)] = m * num_e
        for i in range(num_lora):
            for p in (layer.lora_A[i], layer.lora_B[i]):
                if p.requires_grad:
                    buckets[f"lora{i}"].append(p)
                    cells[id(p)] = m * num_e + fft + i
    inside = {id(p) for _, layer in layers for p in layer.parameters()}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
    buckets["other"] = [p for p in others if p.ndim >= 2]
    buckets["other_no_decay"] = [p for p in others if p.ndim < 2]
    hyper = {
        "fft": (lr, weight_decay),
        "fft_bias": (lr, 0.0),
        "other": (lr, weight_decay),
        "other_no_decay": (lr, 0.0),
    }
    groups = []
    for key, params in buckets.items():
        if params:
            group_lr, group_wd = hyper.get(key, (lora_lr, lora_weight_decay))
            groups.append({"params": params, "name": key, "lr": group_lr, "weight_decay": group_wd})
    return groups, cells


def layout(
    cells: dict[int, int],
    routed: list[Tensor],
    num_modules: int,
    num_experts: int,
    device: torch.device,
) -> Layout:
    """Where each routed tensor (module by module) sits in the [modules x experts]
    table, with each cell's size ``N_e`` (at least 1) and whether it has a tensor."""
    num_cells = num_modules * num_experts
    idx = [cells[id(p)] for p in routed]
    sizes = torch.zeros(num_cells, dtype=torch.float32)
    for i, p in zip(idx, routed):
        sizes[i] += p.numel()
    firsts = torch.arange(num_modules + 1) * num_experts
    return Layout(
        cell_index=torch.tensor(idx, dtype=torch.int64, device=device),
        module_starts=torch.searchsorted(torch.tensor(idx, dtype=torch.int64), firsts),
        cell_sizes=sizes.clamp_min(1.0).to(device),
        participating=(sizes > 0).view(num_modules, -1).to(device),
    )
