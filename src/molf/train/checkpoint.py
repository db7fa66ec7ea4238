"""Checkpoints, written atomically: a temporary directory renamed into place.

A checkpoint holds the trainable parameters (frozen ones come back from the base
model), the optimizer and scheduler state, the RNG states and the step. The data
order is a function of the step (see ``data.py``), so nothing else is needed to
continue exactly where the run stopped.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molf.atomic import atomic_directory, fsync_tree, replace_dir
from molf.errors import MolfError
from molf.ownership import TEMP_PREFIX, disown, owned

PATTERN = re.compile(r"checkpoint-(\d+)$")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    keep: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>/`` atomically; ``extra`` holds state the method keeps
    outside parameters and optimizer (returned by :func:`load_checkpoint`)."""
    with atomic_directory(run_dir / f"checkpoint-{step}") as tmp:
        torch.save(
            {
                "step": step,
                "model": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "extra": extra or {},
                "rng": {
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            },
            tmp / "state.pt",
        )
        (tmp / "meta.json").write_text(json.dumps({"step": step}))
    prune_checkpoints(run_dir, keep)
    return run_dir / f"checkpoint-{step}"


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    checkpoints = list_checkpoints(run_dir)
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        (old / "meta.json").unlink(missing_ok=True)  # incomplete first: a stop mid-delete
        shutil.rmtree(old, ignore_errors=True)  # leaves no half checkpoint to resume from
        disown(old)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints that molf wrote, oldest first."""
    ours = owned(run_dir)
    found = [
        (int(m.group(1)), p)
        for p in run_dir.glob("checkpoint-*")
        if p.name in ours and (m := PATTERN.fullmatch(p.name)) and (p / "meta.json").is_file()
    ]
    return [p for _, p in sorted(found)]


class CorruptCheckpoint(MolfError):
    """A checkpoint file that cannot be read (truncated, garbage, missing)."""


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at ``path`` was written by several processes (its meta.json)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{path / 'meta.json'} is unreadable ({e})") from None
    return bool(isinstance(meta, dict) and meta.get("sharded"))


def read_state(path: Path) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file, or :class:`CorruptCheckpoint` naming it."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # truncated zip, garbage bytes, missing file: all unreadable
        raise CorruptCheckpoint(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptCheckpoint(f"{path} does not hold a molf checkpoint")
    return state


def load_checkpoint(
    path: Path, model: nn.Module, optimizer, scheduler
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint into the (already wrapped) model; returns its step and the
    ``extra`` state saved with it."""
    if is_sharded(path):
        raise MolfError(
            f"--resume: {path} is a sharded checkpoint; resume it with torchrun "
            "and the same --parallel mode"
        )
    state: dict[str, Any] = read_state(path / "state.pt")
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
    return int(state["step"]), state.get("extra", {})


def save_sharded(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    keep: int,
    rank: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Multi-process checkpoint with torch.distributed.checkpoint: each rank writes its
    shards; rank 0 adds the scheduler and ``extra`` and marks the directory complete,
    then renames it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f"{TEMP_PREFIX}checkpoint-{step}.tmp"
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
        torch.save(
            {"step": step, "scheduler": scheduler.state_dict(), "extra": extra or {}},
            tmp / "extra.pt",
        )
    dist.barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "sharded": True}))
        fsync_tree(tmp)
        replace_dir(tmp, final)
        prune_checkpoints(run_dir, keep)
    dist.barrier()


def load_sharded(
    path: Path, model: nn.Module, optimizer, scheduler, rank: int
) -> tuple[int, dict[str, Any]]:
    """Restore a sharded checkpoint on every rank; returns its step and ``extra``. A
    shard that cannot be read raises CorruptCheckpoint on every rank (dcp reports a
    reader's failure to all of them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not is_sharded(path):
        raise MolfError(
            f"--resume: {path} was written by a single process; resume it without torchrun"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
        extra = torch.load(path / "extra.pt", weights_only=False)
        rng = torch.load(path / f"rng-{rank}.pt", weights_only=False)
    except CheckpointException as e:  # a BaseException: every rank gets each reader's error
        failures = "; ".join(f"rank {r}: {type(x[0]).__name__}" for r, x in e.failures.items())
        raise CorruptCheckpoint(f"{path} cannot be read ({failures})") from None
    except Exception as e:
        raise CorruptCheckpoint(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(extra["step"]), extra.get("extra", {})


def write_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer,
    scheduler,
    keep: int,
    extra: dict[str, Any],
    rank: int | None = None,
) -> None:
    """``checkpoint-<step>/``: written by this process alone (``rank`` None), or as
    shards by every rank of a process group (``rank`` given; all ranks call it)."""
    if rank is None:
        save_checkpoint(run_dir, step, model, optimizer, scheduler, keep, extra=extra)
    else:
        save_sharded(run_dir, step, model, optimizer, scheduler, keep, rank, extra)


def load_latest_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer,
    scheduler,
    rank: int | None = None,
    warn: Callable[[str], None] = print,
) -> tuple[int, dict[str, Any]]:
    """Restore the newest readable checkpoint (single-process, or sharded when ``rank``
    is given); an unreadable one is reported through ``warn`` and the one before it
    tried. Returns its step and ``extra`` state."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            if rank is None:
                return load_checkpoint(path, model, optimizer, scheduler)
            return load_sharded(path, model, optimizer, scheduler, rank)
        except CorruptCheckpoint as e:
            warn(f"warning: skipping {path.name}: {e}")
    raise MolfError(f"--resume: no readable checkpoint in {run_dir}")
