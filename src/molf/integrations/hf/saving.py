"""The merged model's state dict through wrappers: what ``save_model()`` writes (the plain
model) and what checkpoints hold beside the MoLF tensors (so a plain ``from_pretrained``
loads the trained model). The computation is :func:`molf.model.merged_state`."""

from __future__ import annotations

import torch
from torch import nn

from molf.errors import MolfError
from molf.integrations.hf.discovery import find_molf_model
from molf.model import merged_state


def merged_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    keep_experts: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict of the merged model (what ``merge_and_unload`` would give, to the
    bit), computed without changing ``model``, which may be wrapped (DDP, DeepSpeed,
    FSDP1, ``torch.compile``).

    ``state_dict`` (default ``model.state_dict()``) is a full state dict of the MoLF
    model, e.g. one gathered from FSDP; each MoLF layer's tensors (its
    :meth:`~molf.layer.MoLFLinear.state_keys`) become ``weight``
    (``W' = W + sum_i s_i B_i A_i``, :meth:`~molf.layer.MoLFLinear.merged_weight`) and
    ``bias``, in place in the key order, on the CPU; every other entry is kept as it is.
    With ``keep_experts``, the MoLF tensors stay too, so the dict both loads into the
    MoLF model (which ignores ``weight`` and ``bias``) and, by name, into the plain
    model. A layer none of whose tensors are in ``state_dict``, or whose ``weight``
    already is, is left alone. See :func:`molf.model.merged_state`.
    """
    molf_model = find_molf_model(model)
    if molf_model is None:
        raise MolfError("merged_state_dict needs a model wrapped by get_molf_model")
    return merged_state(molf_model, state_dict, keep_experts=keep_experts)
