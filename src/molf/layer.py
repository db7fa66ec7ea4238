"""MoLFLinear: a linear layer with an FFT expert (the dense weight) and LoRA experts.

    y = x W^T + b + sum_i s_i (x A_i^T) B_i^T

Two ways to get the same gradients:

* **dual path**: the LoRA branch runs per token beside the base layer, all experts as
  one LoRA of rank ``sum(r_i)`` whose output one ``addmm`` adds to the base output.
  Needed for LoRA dropout (which applies to the LoRA input only) and cheap when ``W``
  is frozen (MoLF-E), since ``dL/dW`` is then never formed.
* **fused path**: forms ``W' = W + sum_i s_i B_i A_i`` on the fly and runs one matmul.
  With ``G = dL/dW'`` (which FFT computes anyway), the LoRA gradients are
  ``dL/dB_i = s_i G A_i^T`` and ``dL/dA_i = s_i B_i^T G``: ``O(d_out d_in r)`` per step,
  independent of the number of tokens. Two ways to run it (``fused_weight``):

  - **keep**: ``W'`` is built by ``addmm`` and kept for backward by autograd's own
    nodes, so a layer costs two built-in ops and no Python in backward. Under autocast
    this is free: FFT keeps a bf16 copy of every weight for backward as well, and
    ``W'`` takes its place. The default off the CPU and under autocast.
  - **recompute**: a custom autograd Function saves only ``x`` and rebuilds ``W'`` in
    backward (in a reused CPU workspace), so no weight-sized activation is kept. The
    default on the CPU without autocast, where a step's time is arithmetic, not
    Python, and a fresh ``W'`` per layer would cost page faults and memory.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _merge(
    weight: torch.Tensor,
    lora_a: Iterable[torch.Tensor],
    lora_b: Iterable[torch.Tensor],
    scalings: tuple[float, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W' = W + sum_i s_i B_i A_i``, the one builder of the merged weight, for one or
    more experts whose operands share one dtype. ``W'`` is a new tensor (or ``out``);
    ``weight`` is never written to. The first expert's product and the sum are one
    ``addmm``, each further expert one in-place ``addmm_`` on ``W'`` (this runs twice per
    layer and step); autograd tracks it like the out-of-place chain, since ``addmm``
    needs neither its input nor its output for backward."""
    experts = zip(scalings, lora_a, lora_b)
    s, a, b = next(experts)
    w = torch.addmm(weight, b, a, alpha=s, out=out)
    for s, a, b in experts:
        w.addmm_(b, a, alpha=s)
    return w


def _stack(
    lora_a: Iterable[torch.Tensor], lora_b: Iterable[torch.Tensor], scalings: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts as one LoRA of rank ``R = sum_i r_i`` and scaling 1:
    ``A = [A_0; A_1; ...]`` (``R x d_in``) and ``B = [s_0 B_0, s_1 B_1, ...]``
    (``d_out x R``), so that ``B A = sum_i s_i B_i A_i``. Both are new tensors."""
    a = torch.cat(tuple(lora_a))
    b = torch.cat([bi * s for bi, s in zip(lora_b, scalings)], dim=1)
    return a, b


_scratch = threading.local()
_NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing


def _workspace(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """A reused buffer for ``W'`` on the CPU, one per thread and dtype, as large as the
    largest weight seen. ``W'`` lives only inside one forward or one backward call, and
    a fresh ``d_out x d_in`` allocation there costs page faults on every call (the CPU
    allocator hands big blocks back to the OS), about 8% of a step at hidden 1024. On
    other devices the caching allocator already reuses memory: ``None``. Under
    ``torch.compile`` the compiler plans the memory itself (and cannot trace a
    thread-local buffer): ``None``. The view for each shape is kept too (two calls per
    layer and step: slicing anew costs more than the lookup)."""
    if not weight.is_cpu or torch.compiler.is_compiling():
        return None
    views = getattr(_scratch, "views", None)
    if views is None:
        views = _scratch.views = {}
        _scratch.bufs = {}
    key = (dtype, weight.shape)
    view = views.get(key)
    if view is None:
        buf = _scratch.bufs.get(dtype)
        if buf is None or buf.numel() < weight.numel():
            buf = _scratch.bufs[dtype] = torch.empty(weight.numel(), dtype=dtype)
            for old in [k for k in views if k[0] == dtype]:  # views of the old buffer
                del views[old]
        view = views[key] = buf[: weight.numel()].view(weight.shape)
    return view


def _linear_with_kept_weight(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scalings: tuple[float, ...],
    lora_a: dict[str, torch.Tensor],
    lora_b: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``x W'^T + b`` with ``W'`` built by ``addmm`` and kept by autograd for backward,
    whose built-in nodes then give ``dL/dW = G``, ``dL/dB_i = s_i G A_i^T`` and
    ``dL/dA_i = s_i B_i^T G``. ``lora_a``/``lora_b`` are the experts' parameter dicts.

    Under autocast ``W'`` is built explicitly (autocast would keep its own cached copy
    of ``W`` in the low dtype until the forward ends), from low-precision operands where
    :func:`_builds_in_low_precision`, else in ``W``'s dtype and then cast (two ops, one
    rounding)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if not _builds_in_low_precision(device_type):
            with torch.autocast(device_type, enabled=False):
                weight = _merge(weight, lora_a.values(), lora_b.values(), scalings).to(dtype)
            return F.linear(x, weight, bias)
        weight = weight.to(dtype)
        lora_a = {k: t.to(dtype) for k, t in lora_a.items()}
        lora_b = {k: t.to(dtype) for k, t in lora_b.items()}
    return F.linear(x, _merge(weight, lora_a.values(), lora_b.values(), scalings), bias)


def _builds_in_low_precision(device_type: str) -> bool:
    """Whether autocast's ``W'`` is built from low-precision operands: on accelerators,
    whose tensor cores do the ``d_out x r x d_in`` product many times faster than in
    float32. Not on the CPU, where a small bf16 GEMM costs several times a float32 one
    plus the cast (20 vs 6 us at 64 x 8 x 64)."""
    return device_type != "cpu"


def _fused_weight(
    weight: torch.Tensor,
    loras: Sequence[torch.Tensor],
    scalings: tuple[float, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``W' = W + sum_i s_i B_i A_i`` in ``dtype``, in the CPU workspace where there is
    one; ``loras`` is the fused Function's flat ``(A_0, B_0, A_1, B_1, ...)``."""
    cast = [t.to(dtype) for t in loras]
    out = _workspace(weight, dtype)
    return _merge(weight.to(dtype), cast[0::2], cast[1::2], scalings, out)


class _FusedLoRALinear(torch.autograd.Function):
    """``y = x (W + sum_i s_i B_i A_i)^T + b`` with LoRA gradients derived from ``dL/dW``."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, scalings, *loras):  # type: ignore[override]
        device_type = x.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
        with torch.autocast(device_type, enabled=False) if autocast_on else _NO_CONTEXT:
            w = _fused_weight(weight, loras, scalings, dtype)
            y = F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))
            del w  # not saved: recomputed in backward (saving it would cost a weight's memory)
        ctx.scalings, ctx.dtype = scalings, dtype
        ctx.save_for_backward(x, weight, bias, *loras)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):  # type: ignore[override]
        x, weight, bias, *loras = ctx.saved_tensors
        scalings, dtype = ctx.scalings, ctx.dtype
        needs = ctx.needs_input_grad
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        grad_x = grad_w = grad_b = None
        device_type = x.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        with torch.autocast(device_type, enabled=False) if autocast_on else _NO_CONTEXT:
            if needs[0]:
                w = _fused_weight(weight, loras, scalings, dtype)
                grad_x = (g @ w).reshape(x.shape).to(x.dtype)
                del w
            if bias is not None and needs[2]:
                grad_b = g.sum(0).to(bias.dtype)
            lora_grads: list[torch.Tensor | None] = [None] * len(loras)
            if needs[1] or any(needs[4:]):
                big_g = g.t() @ x.reshape(-1, x.shape[-1]).to(dtype)  # dL/dW', d_out x d_in
                if needs[1]:
                    grad_w = big_g.to(weight.dtype)
                for i, s in enumerate(scalings):
                    a, b = loras[2 * i], loras[2 * i + 1]
                    # s B^T G and s G A^T, each one addmm (beta=0: its input is ignored)
                    ad, bd = a.to(dtype), b.to(dtype)
                    if needs[4 + 2 * i]:
                        da = torch.addmm(ad, bd.t(), big_g, beta=0, alpha=s)
                        lora_grads[2 * i] = da.to(a.dtype)
                    if needs[5 + 2 * i]:
                        db = torch.addmm(bd, big_g, ad.t(), beta=0, alpha=s)
                        lora_grads[2 * i + 1] = db.to(b.dtype)
        return (grad_x, grad_w, grad_b, None, *lora_grads)


@dataclass(frozen=True)
class StateKeys:
    """The state-dict keys of one :class:`MoLFLinear`'s tensors (see
    :meth:`MoLFLinear.state_keys`): ``W``, ``b`` (``None`` without a bias), the
    ``A_i`` and the ``B_i``."""

    weight: str
    bias: str | None
    lora_a: tuple[str, ...]
    lora_b: tuple[str, ...]

    def all(self) -> list[str]:
        """Every key, in ``state_dict`` order: ``W``, ``b``, the ``A_i``, the ``B_i``."""
        bias = [] if self.bias is None else [self.bias]
        return [self.weight, *bias, *self.lora_a, *self.lora_b]


class MoLFLinear(nn.Module):
    """An ``nn.Linear`` reparameterized as an FFT expert plus LoRA experts.

    ``base_layer`` is the wrapped ``nn.Linear`` (the FFT expert). ``lora_A[i]`` is
    ``r_i x d_in`` (kaiming-uniform, a=sqrt(5)) and ``lora_B[i]`` is ``d_out x r_i``
    (zeros), so a fresh wrap leaves outputs unchanged. ``scalings[i]`` is ``s_i``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        ranks: tuple[int, ...],
        scalings: tuple[float, ...],
        lora_dropout: float = 0.0,
        grad_path: str = "auto",
        fused_weight: str = "auto",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scalings = tuple(float(s) for s in scalings)
        self.ranks = tuple(ranks)
        w = base_layer.weight
        factory = {"device": w.device, "dtype": w.dtype}
        self.lora_A = nn.ParameterList(
            [nn.Parameter(torch.empty(r, base_layer.in_features, **factory)) for r in ranks]
        )
        self.lora_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(base_layer.out_features, r, **factory)) for r in ranks]
        )
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.grad_path = grad_path
        self.fused_weight = fused_weight

    # nn.Linear's attributes, so model code that reads them keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def uses_fused_path(self) -> bool:
        """Whether gradients come from ``dL/dW`` (see the module docstring)."""
        return self._fused(self.base_layer.weight)

    def _fused(self, weight: torch.Tensor) -> bool:
        if self.grad_path == "auto":
            return weight.requires_grad and isinstance(self._modules["lora_dropout"], nn.Identity)
        return self.grad_path == "fused"

    def keeps_fused_weight(self, x: torch.Tensor) -> bool:
        """Whether the fused path keeps ``W'`` for backward (see the module docstring)."""
        if self.fused_weight == "auto":
            return not x.is_cpu or torch.is_autocast_enabled("cpu")
        return self.fused_weight == "keep"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Submodules and the experts' parameters are read from their dicts: on this
        # per-layer path each nn.Module.__getattr__ costs more than the lookup itself.
        # The dicts are the live registries (current also when FSDP2 swaps tensors).
        base = self._modules["base_layer"]
        weight, bias = base.weight, base.bias  # attributes: a parametrized W works too
        lora_a = self._modules["lora_A"]._parameters
        lora_b = self._modules["lora_B"]._parameters
        # Without autograd (generation) the per-token path is the cheap one.
        if torch.is_grad_enabled() and self._fused(weight):
            if self.keeps_fused_weight(x):
                return _linear_with_kept_weight(x, weight, bias, self.scalings, lora_a, lora_b)
            loras = [t for ab in zip(lora_a.values(), lora_b.values()) for t in ab]
            return _FusedLoRALinear.apply(x, weight, bias, self.scalings, *loras)
        y = base(x)
        dropout = self._modules["lora_dropout"]
        if not isinstance(dropout, nn.Identity):
            x = dropout(x)
        # All experts as one LoRA (one expert as it is, its scaling addmm's alpha); the
        # branch's output is accumulated into y by one addmm (no T x d_out temporaries).
        if len(self.scalings) == 1:
            (a,), (b,), alpha = lora_a.values(), lora_b.values(), self.scalings[0]
        else:
            (a, b), alpha = _stack(lora_a.values(), lora_b.values(), self.scalings), 1.0
        h = F.linear(x, a)
        y2 = y.reshape(-1, y.shape[-1])
        return torch.addmm(y2, h.reshape(-1, h.shape[-1]), b.t(), alpha=alpha).view(y.shape)

    def state_keys(self, prefix: str = "") -> StateKeys:
        """The keys of this layer's tensors in ``state_dict(prefix=prefix)``:
        ``{prefix}base_layer.weight`` (``W``), ``{prefix}base_layer.bias`` (``b``; ``None``
        without a bias), and ``{prefix}lora_A.{i}``, ``{prefix}lora_B.{i}`` (``A_i``,
        ``B_i``) for each expert ``i``. In a model's state dict ``prefix`` is the layer's
        qualified name and a dot."""
        experts = range(len(self.ranks))
        return StateKeys(
            weight=f"{prefix}base_layer.weight",
            bias=None if self.base_layer.bias is None else f"{prefix}base_layer.bias",
            lora_a=tuple(f"{prefix}lora_A.{i}" for i in experts),
            lora_b=tuple(f"{prefix}lora_B.{i}" for i in experts),
        )

    @torch.no_grad()
    def merged_weight(
        self, state: Mapping[str, torch.Tensor] | None = None, prefix: str = ""
    ) -> torch.Tensor:
        """``W' = W + sum_i s_i B_i A_i``, the weight of the plain ``nn.Linear`` this layer
        merges into (whose ``x W'^T + b`` is the layer's output without dropout), computed
        in fp32 and cast back to ``W``'s dtype: a new tensor on ``W``'s device.

        From the layer's own parameters, or, with ``state``, from the tensors that
        :meth:`state_keys` ``(prefix)`` names in it (e.g. a full state dict gathered from
        FSDP, whose layer holds only shards)."""
        if state is None:
            w, lora_a, lora_b = self.base_layer.weight, self.lora_A, self.lora_B
        else:
            keys = self.state_keys(prefix)
            w = state[keys.weight]
            lora_a = [state[k] for k in keys.lora_a]
            lora_b = [state[k] for k in keys.lora_b]
        a32, b32 = [a.float() for a in lora_a], [b.float() for b in lora_b]
        return _merge(w.float(), a32, b32, self.scalings).to(w.dtype)

    @torch.no_grad()
    def merged_linear_state(
        self, state: Mapping[str, torch.Tensor] | None = None, prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        """The state dict of the plain ``nn.Linear`` this layer merges into, under
        ``prefix``: ``weight`` (:meth:`merged_weight`) and ``bias`` (``b``, a copy; absent
        without a bias), on the CPU, from the layer's own tensors or from ``state``."""
        out = {prefix + "weight": self.merged_weight(state, prefix).to("cpu")}
        bias_key = self.state_keys(prefix).bias
        if bias_key is not None:
            bias = self.base_layer.bias if state is None else state[bias_key]
            out[prefix + "bias"] = bias.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def stacked_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts as one LoRA ``(A, B)`` of rank ``R = sum_i r_i`` and scaling 1, as
        the export to a PEFT adapter writes it: ``A = [A_0; A_1; ...]`` (``R x d_in``),
        ``B = [s_0 B_0, s_1 B_1, ...]`` (``d_out x R``), so ``B A = sum_i s_i B_i A_i``.
        New contiguous tensors in the experts' dtype, not tracked by autograd."""
        return _stack(self.lora_A, self.lora_B, self.scalings)

    def extra_repr(self) -> str:
        return f"ranks={self.ranks}, scalings={tuple(round(s, 4) for s in self.scalings)}"
