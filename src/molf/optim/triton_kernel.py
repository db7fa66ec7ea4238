"""The routed step in Triton kernels on a GPU (``implementation="triton"``).

The same passes as the foreach path, each one kernel launch over every tensor at once
(a table of chunks, each naming its tensor and first element; the tensors' addresses
are uploaded each step from pinned memory without waiting):

* ``_nonfinite``: read every gradient once; set ``found_inf`` if any entry is NaN/inf;
* ``_moments``: read ``g, m, v``, write ``m, v`` (not when ``found_inf``) and each
  chunk's score partial sum over the new moments (summed per tensor in float64 by a
  cumulative sum: deterministic);
* ``_update``: AdamW on the chunks of tensors whose mask is non-zero; the others'
  loads and stores are masked off, so losers' weights are not read.

Routing between the last two is :func:`molf.optim.functional.route` (a NaN or
infinite score never wins), and a loser's weights are never loaded, so a NaN
or infinite learning rate on a loser cannot reach them. float32 tensors only;
square roots and divisions are IEEE-rounded (``sqrt_rn``, ``div_rn``) so results match
the other paths to float32 rounding. Nothing here reads a device value on the host.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from molf.optim.foreach import ThreePassStep
from molf.optim.functional import (
    Layout,
    adamw_coefficients,
    check_sizes,
    check_state,
    plain_float32,
    to_device,
)

BLOCK = 2048


@triton.jit
def _nonfinite(g_ptrs, numels, chunk_t, chunk_s, found_ptr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_t + c)
    offs = tl.load(chunk_s + c) + tl.arange(0, BLOCK)
    g = tl.load(g_ptrs + t).to(tl.pointer_type(tl.float32))
    x = tl.load(g + offs, mask=offs < tl.load(numels + t), other=0.0)
    bad = tl.sum(((x != x) | (tl.abs(x) > 3.4028234663852886e38)).to(tl.int32), axis=0)
    tl.store(found_ptr, 1.0, mask=bad > 0)


@triton.jit
def _moments(
    g_ptrs,
    m_ptrs,
    v_ptrs,
    numels,
    chunk_t,
    chunk_s,
    found_ptr,
    partial_ptr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    PFN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_t + c)
    offs = tl.load(chunk_s + c) + tl.arange(0, BLOCK)
    inside = offs < tl.load(numels + t)
    keep = (tl.zeros([BLOCK], dtype=tl.float32) + tl.load(found_ptr)) == 0.0  # block-wide
    g = tl.load(g_ptrs + t).to(tl.pointer_type(tl.float32))
    m = tl.load(m_ptrs + t).to(tl.pointer_type(tl.float32))
    v = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
    gx = tl.load(g + offs, mask=inside & keep, other=0.0)
    mx = tl.load(m + offs, mask=inside, other=0.0)
    vx = tl.load(v + offs, mask=inside, other=0.0)
    m2 = tl.where(keep, beta1 * mx + one_minus_beta1 * gx, mx)
    v2 = tl.where(keep, beta2 * vx + one_minus_beta2 * (gx * gx), vx)
    tl.store(m + offs, m2, mask=inside & keep)
    tl.store(v + offs, v2, mask=inside & keep)
    r = tl.div_rn(m2, tl.sqrt_rn(v2) + eps)
    if PFN:
        val = r * r
    else:
        val = m2 * r
    tl.store(partial_ptr + c, tl.sum(tl.where(inside, val, 0.0), axis=0))


@triton.jit
def _update(
    p_ptrs, m_ptrs, v_ptrs, numels, chunk_t, chunk_s, mask_ptr, coef_ptr, eps, BLOCK: tl.constexpr
):
    c = tl.program_id(0)
    t = tl.load(chunk_t + c)
    offs = tl.load(chunk_s + c) + tl.arange(0, BLOCK)
    selected = (tl.zeros([BLOCK], dtype=tl.float32) + tl.load(mask_ptr + t)) != 0.0
    on = (offs < tl.load(numels + t)) & selected
    decay = tl.load(coef_ptr + 3 * t)
    size = tl.load(coef_ptr + 3 * t + 1)
    rbc2 = tl.load(coef_ptr + 3 * t + 2)
    p = tl.load(p_ptrs + t).to(tl.pointer_type(tl.float32))
    m = tl.load(m_ptrs + t).to(tl.pointer_type(tl.float32))
    v = tl.load(v_ptrs + t).to(tl.pointer_type(tl.float32))
    px = tl.load(p + offs, mask=on, other=0.0)
    mx = tl.load(m + offs, mask=on, other=0.0)
    vx = tl.load(v + offs, mask=on, other=0.0)
    px = px * decay - size * tl.div_rn(mx, tl.sqrt_rn(vx) * rbc2 + eps)
    tl.store(p + offs, px, mask=on)


class _Chunks:
    """The chunk table of a list of tensor sizes, on the device (built once per list)."""

    def __init__(self, numels: list[int], device: torch.device) -> None:
        tid, start, first, last = [], [], [], []
        for i, n in enumerate(numels):
            first.append(len(tid))
            for s in range(0, max(n, 1), BLOCK):
                tid.append(i)
                start.append(s)
            last.append(len(tid))
        self.count = len(tid)
        self.tensor = torch.tensor(tid, dtype=torch.int64, device=device)
        self.start = torch.tensor(start, dtype=torch.int64, device=device)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=device)
        # Per-tensor sums of per-chunk values: cumsum[last] - cumsum[first].
        self.first = torch.tensor(first, dtype=torch.int64, device=device)
        self.last = torch.tensor(last, dtype=torch.int64, device=device)

    def per_tensor(self, per_chunk: Tensor) -> Tensor:
        cs = torch.cat([per_chunk.new_zeros(1, dtype=torch.float64), per_chunk.double().cumsum(0)])
        return cs[self.last] - cs[self.first]


class TritonKernel(ThreePassStep):
    """The three passes as one kernel launch each."""

    name = "triton"

    def __init__(self) -> None:
        self._chunks: dict[tuple[int, ...], _Chunks] = {}

    def _table(self, tensors: list[Tensor]) -> _Chunks:
        key = tuple(t.numel() for t in tensors)
        table = self._chunks.get(key)
        if table is None:
            table = self._chunks[key] = _Chunks(list(key), tensors[0].device)
        return table

    def routed_step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        lrs: list[float],
        weight_decays: list[float],
        layout: Layout,
        found_inf: Tensor,
        **hyper: Any,
    ) -> tuple[Tensor, Tensor]:
        """As :class:`ThreePassStep`'s, once no launch can run past a buffer: each pass
        spans the sizes of the tensors that drive it (gradients, parameters) and writes
        the moments and parameters, so the state must fit (:func:`check_state`, once
        per layout) and this step's parameters and gradients have its sizes
        (:func:`check_sizes`, every step, no device work)."""
        sizes = layout.state_tables.get(self.name)
        if sizes is None:
            sizes = layout.state_tables[self.name] = check_state(
                self.name, params, exp_avgs, exp_avg_sqs, state_steps
            )
        check_sizes(self.name, "parameter", params, sizes)
        check_sizes(self.name, "gradient", grads, sizes)
        return super().routed_step(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            state_steps,
            lrs,
            weight_decays,
            layout,
            found_inf,
            **hyper,
        )

    def supports(self, *tensor_lists: list[Tensor]) -> bool:
        # A GPU, or anywhere under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return plain_float32(tensor_lists, on_cpu=None if interpreted else False)

    def nonfinite(self, grads: list[Tensor]) -> Tensor:
        table = self._table(grads)
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        ptrs = to_device([g.data_ptr() for g in grads], torch.int64, found.device)
        _nonfinite[(table.count,)](ptrs, table.numel, table.tensor, table.start, found, BLOCK=BLOCK)
        return found

    def moments_and_scores(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        lrs: list[float],
        found_inf: Tensor,
        *,
        beta1: float,
        beta2: float,
        eps: float,
        score: str,
    ) -> Tensor:
        """As :func:`molf.optim.foreach.moments_and_scores` (``params`` unused): fp32
        per-tensor score sums, times lr for EPD; the step counts move unless ``found_inf``."""
        device = found_inf.device
        if not grads:
            return torch.zeros(0, dtype=torch.float32, device=device)
        table = self._table(grads)
        ptrs = to_device(
            [t.data_ptr() for ts in (grads, exp_avgs, exp_avg_sqs) for t in ts],
            torch.int64,
            device,
        ).view(3, -1)
        partial = torch.empty(table.count, dtype=torch.float32, device=device)
        _moments[(table.count,)](
            ptrs[0],
            ptrs[1],
            ptrs[2],
            table.numel,
            table.tensor,
            table.start,
            found_inf,
            partial,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            PFN=score == "pfn",
            BLOCK=BLOCK,
        )
        keep = 1.0 - found_inf
        torch._foreach_add_(state_steps, [keep] * len(state_steps))
        sums = table.per_tensor(partial)
        if score == "epd":
            sums = sums * to_device(lrs, torch.float64, device)
        return sums.float()

    def masked_update(
        self,
        params: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        mask: Tensor,
        lrs: list[float],
        weight_decays: list[float],
        *,
        beta1: float,
        beta2: float,
        eps: float,
    ) -> None:
        """As :func:`molf.optim.foreach.masked_update`: AdamW where ``mask`` is non-zero."""
        device = mask.device
        if not params:
            return
        table = self._table(params)
        hyper = to_device([*lrs, *weight_decays], torch.float64, device).view(2, -1)
        coef = adamw_coefficients(
            torch.stack(state_steps), hyper[0], hyper[1], beta1=beta1, beta2=beta2
        ).float()
        ptrs = to_device(
            [t.data_ptr() for ts in (params, exp_avgs, exp_avg_sqs) for t in ts],
            torch.int64,
            device,
        ).view(3, -1)
        _update[(table.count,)](
            ptrs[0],
            ptrs[1],
            ptrs[2],
            table.numel,
            table.tensor,
            table.start,
            mask.float().contiguous(),
            coef,
            eps,
            BLOCK=BLOCK,
        )


_kernel: TritonKernel | None = None


def load() -> TritonKernel:
    global _kernel
    if _kernel is None:
        _kernel = TritonKernel()
    return _kernel
