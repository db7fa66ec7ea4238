"""Checkpoints, written atomically: a temporary directory renamed into place.

A checkpoint holds the trainable parameters (frozen ones come back from the base
model), the optimizer and scheduler state, the RNG states and the step. The data
order is a function of the step (see ``data.py``), so nothing else is needed to
continue exactly where the run stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molf.errors import MolfError

PATTERN = re.compile(r"checkpoint-(\d+)$")


def atomic_dir(final: Path) -> Path:
    """A fresh temporary directory beside ``final``, to be renamed with :func:`commit_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, keep: int
) -> Path:
    final = run_dir / f"checkpoint-{step}"
    tmp = atomic_dir(final)
    try:
        torch.save(
            {
                "step": step,
                "model": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            },
            tmp / "state.pt",
        )
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in run_dir.glob("checkpoint-*")
        if (m := PATTERN.search(p.name)) and (p / "meta.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> int:
    """Restore a checkpoint into the (already wrapped) model; returns its step."""
    if not (path / "state.pt").is_file():
        raise MolfError(
            f"--resume: {path} is a sharded checkpoint; resume it with torchrun "
            "and the same --parallel mode"
        )
    state: dict[str, Any] = torch.load(path / "state.pt", weights_only=False)
    params = dict(model.named_parameters())
    missing = [n for n in state["model"] if n not in params]
    expected = {n for n, p in params.items() if p.requires_grad}
    if missing or expected - set(state["model"]):
        raise MolfError(
            f"--resume: {path} does not match this model/method "
            f"(unknown {missing[:3]}, missing {sorted(expected - set(state['model']))[:3]})"
        )
    with torch.no_grad():
        for n, t in state["model"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def save_sharded(
    run_dir: Path, step: int, model: nn.Module, optimizer, scheduler, keep: int, rank: int
) -> None:
    """Multi-process checkpoint with torch.distributed.checkpoint: each rank writes its
    shards; rank 0 adds the scheduler and marks the directory complete, then renames it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / f"rng-{rank}.pt",
    )
    if rank == 0:
        torch.save({"step": step, "scheduler": scheduler.state_dict()}, tmp / "extra.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "sharded": True}))
        commit_dir(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(path: Path, model: nn.Module, optimizer, scheduler, rank: int) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not json.loads((path / "meta.json").read_text()).get("sharded"):
        raise MolfError(
            f"--resume: {path} was written by a single process; resume it without torchrun"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    extra = torch.load(path / "extra.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    rng = torch.load(path / f"rng-{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(extra["step"])
