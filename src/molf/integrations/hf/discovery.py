"""Finding MoLF's model and optimizer inside what Hugging Face hands around: models
wrapped by DDP, DeepSpeed, FSDP1 or ``torch.compile``; optimizers wrapped by
accelerate's ``AcceleratedOptimizer``, a ``Trainer`` or DeepSpeed."""

from __future__ import annotations

from typing import Any

from torch import nn

from molf.errors import MolfError
from molf.optim import MoLFAdamW, Routing


def find_molf_model(obj: Any) -> nn.Module | None:
    """The MoLF model (the module holding ``molf_config``) inside ``obj``, looking through
    wrappers that keep the model as ``.module`` (DDP, DeepSpeed, FSDP1) or ``._orig_mod``
    (``torch.compile``); ``None`` when there is none."""
    seen: set[int] = set()
    while isinstance(obj, nn.Module) and id(obj) not in seen:
        if getattr(obj, "molf_config", None) is not None:
            return obj
        seen.add(id(obj))
        obj = getattr(obj, "module", None) or getattr(obj, "_orig_mod", None)
    return None


def find_molf_optimizer(obj: Any) -> MoLFAdamW | None:
    """The :class:`~molf.MoLFAdamW` in ``obj`` (itself, or reached through ``.optimizer``:
    accelerate's ``AcceleratedOptimizer``, a ``Trainer``, DeepSpeed's wrappers, ...);
    ``None`` when there is none."""
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        if isinstance(obj, MoLFAdamW):
            return obj
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)
    return None


def routing_of(obj: Any) -> Routing | None:
    """``last_routing`` of the :class:`~molf.MoLFAdamW` in ``obj`` (see
    :func:`find_molf_optimizer`): the last step's routing, ``None`` before the first step.
    Raises :class:`~molf.MolfError` when ``obj`` holds no MoLFAdamW."""
    opt = find_molf_optimizer(obj)
    if opt is None:
        raise MolfError(
            f"routing_of: no MoLFAdamW in {type(obj).__name__} (looked at it and through "
            "its .optimizer attributes)"
        )
    return opt.last_routing
