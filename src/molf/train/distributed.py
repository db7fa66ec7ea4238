"""Data-parallel training on torch.distributed: DDP or FSDP2, launched by torchrun.

Each rank reads its slice of the same global batches (see ``data.py``). Under FSDP2
every decoder layer is one ``fully_shard`` unit (its MoLF experts sharded with it),
and MoLFAdamW all-reduces its ``[modules x experts]`` score sums once per step, so all
ranks route alike. Collectives time out (``--dist-timeout``) instead of hanging when a
rank dies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from molf.errors import MolfError
from molf.model import molf_modules
from molf.optim import MoLFAdamW


@dataclass
class DistContext:
    mode: str  # "none" | "ddp" | "fsdp2"
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(parallel: str, timeout_s: float) -> DistContext:
    """Start the process group when launched by torchrun (or accelerate launch)."""
    cuda = torch.cuda.is_available()
    if not launched_by_torchrun():
        if parallel in ("ddp", "fsdp2"):
            raise MolfError(
                f"--parallel {parallel}: launch with torchrun, e.g. torchrun "
                "--nproc-per-node 2 -m molf train ..."
            )
        return DistContext("none", device=torch.device("cuda" if cuda else "cpu"))
    # Under torchrun every rank must take part in the same run: "auto"/"none" mean DDP.
    mode = "ddp" if parallel in ("auto", "none") else parallel
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(mode, dist.get_rank(), dist.get_world_size(), device)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks HF marks as not to be split (e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise MolfError(
            "--parallel fsdp2: cannot find the model's decoder layers "
            "(_no_split_modules is empty); use --parallel ddp"
        )
    return layers


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP wrapper, or FSDP2 sharding in place (one unit per decoder layer, then the root)."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if ctx.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for _, layer in molf_modules(model):  # a kept W' would be a whole unsharded weight
            if layer.fused_weight == "auto":
                layer.fused_weight = "recompute"
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "config") else model


def install_routing_reduce(optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
    """FSDP2: every rank holds a shard of each expert, so sum the score partial sums."""
    if ctx.mode == "fsdp2" and isinstance(optimizer, MoLFAdamW):
        optimizer.all_reduce_hook = dist.all_reduce


def check_routing_agrees(optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
    """Debug check (``--check-routing``): every rank selected the same experts."""
    if not ctx.active or not isinstance(optimizer, MoLFAdamW) or optimizer.last_routing is None:
        return
    mine = optimizer.last_routing.selected.to(torch.uint8)
    gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(
            "routing differs between ranks: gradients or optimizer states "
            "diverged (this is a bug; please report it)"
        )


def all_reduce_sum(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.active:
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def gather_for_saving(
    model: nn.Module, ctx: DistContext, fresh_model: Callable[[], nn.Module]
) -> nn.Module:
    """The trained model as one plain (unsharded, unwrapped) module on rank 0.

    FSDP2: every rank joins the gather of the full state dict; rank 0 loads it into
    ``fresh_model()``, a newly built (unsharded) copy of the wrapped model on the CPU."""
    if ctx.mode != "fsdp2":
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not ctx.is_main:
        return model
    fresh = fresh_model()
    fresh.load_state_dict(full)
    return fresh
