"""The routed step with torch's ``_foreach`` ops: any device, dtype or tensor subclass.

Three passes over bounded buckets of tensors (the temporaries stay under
2 x :data:`FOREACH_BUCKET` elements): the moments (torch's fused AdamW with lr 0) and
per-tensor score sums; routing on the ``[modules x experts]`` table; the masked AdamW
update. Reductions and per-tensor coefficients are float32 (float64 when a tensor is
float64, never bfloat16).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adamw import adamw as functional_adamw

from molf.optim.functional import AllReduce, Layout, adamw_coefficients, route, to_device

# Elements per bucket: bounds the temporaries (2 x 128 MiB in fp32).
FOREACH_BUCKET = 1 << 25


def _buckets(tensors: list[Tensor], limit: int = FOREACH_BUCKET) -> list[slice]:
    """Consecutive slices of ``tensors`` holding at most ``limit`` elements (or one tensor)."""
    out, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > limit:
            out.append(slice(start, i))
            start, size = i, 0
        size += t.numel()
    if start < len(tensors):
        out.append(slice(start, len(tensors)))
    return out


def _math_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float64 when a tensor is float64, else float32 (also for bfloat16 tensors)."""
    f64 = torch.float64
    return f64 if any(t.dtype is f64 for t in tensors) else torch.float32


def moments_and_scores(
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
    """Moments and step counts of every tensor (untouched when ``found_inf``), then the
    per-tensor score sums ``lr * sum(m^2/(sqrt(v)+eps))`` (EPD) or
    ``sum((m/(sqrt(v)+eps))^2)`` (PFN) over the new moments, ``[len(grads)]``. The
    parameters are left as they are."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32, device=found_inf.device)
    acc = _math_dtype(exp_avgs)
    # torch's fused kernel with lr=0 updates the moments in one pass and honours found_inf.
    functional_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        state_steps,
        fused=True,
        found_inf=found_inf,
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=0.0,
        weight_decay=0.0,
        eps=eps,
        maximize=False,
    )
    partial: list[Tensor] = []
    for b in _buckets(exp_avgs):
        m, v = exp_avgs[b], exp_avg_sqs[b]
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        ratio = torch._foreach_div(m, denom)
        del denom
        if score == "epd":
            torch._foreach_mul_(ratio, m)  # m^2 / (sqrt(v) + eps) >= 0: its L1 norm is its sum
            norms = torch._foreach_norm(ratio, 1, dtype=acc)
            partial += torch._foreach_mul(norms, lrs[b])
        else:
            norms = torch._foreach_norm(ratio, 2, dtype=acc)
            partial += torch._foreach_mul(norms, norms)
    return torch.stack(partial)


def masked_update(
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
    """The AdamW update (:func:`adamw_coefficients`) of ``params[i]`` where ``mask[i]``;
    the others are left unchanged. The moments and step counts must already include
    this step's gradient. A loser's coefficients are chosen (decay 1, step 0), not
    multiplied by 0, so that a NaN or infinite lr cannot reach its weights."""
    if not params:
        return
    acc = _math_dtype(params)
    device = mask.device
    coef = adamw_coefficients(
        torch.stack(state_steps),
        to_device(lrs, torch.float64, device),
        to_device(weight_decays, torch.float64, device),
        beta1=beta1,
        beta2=beta2,
    )
    on = mask.bool()
    decay = list(torch.where(on, coef[:, 0], 1.0).to(acc).unbind())
    neg_size = list(torch.where(on, -coef[:, 1], 0.0).to(acc).unbind())
    rbc2 = list(coef[:, 2].to(acc).unbind())
    for b in _buckets(params):
        denom = torch._foreach_sqrt(exp_avg_sqs[b])
        torch._foreach_mul_(denom, rbc2[b])
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avgs[b], denom)
        del denom
        torch._foreach_mul_(update, neg_size[b])
        torch._foreach_mul_(params[b], decay[b])
        torch._foreach_add_(params[b], update)


def nonfinite(grads: list[Tensor]) -> Tensor:
    """A 0-d float32 tensor: 1 if any gradient holds a NaN or an infinity, else 0."""
    # Norms in each gradient's dtype (reduced in float32 or wider): a float32 `dtype`
    # cannot take float64 gradients.
    norms = torch._foreach_norm(grads, 2)
    return (~torch.stack(norms).sum().isfinite()).float()


class ThreePassStep:
    """A routed step made of a moments-and-scores pass, :func:`route` and a masked
    update pass (the foreach and Triton implementations)."""

    fuses_routing = False

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
        *,
        beta1: float,
        beta2: float,
        eps: float,
        score: str,
        top_k: int,
        all_reduce: AllReduce | None = None,
    ) -> tuple[Tensor, Tensor]:
        hyper = dict(beta1=beta1, beta2=beta2, eps=eps)
        with torch.profiler.record_function("MoLFAdamW.moments_and_scores"):
            partial = self.moments_and_scores(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                lrs,
                found_inf,
                score=score,
                **hyper,
            )
        scores, selected, mask = route(
            partial, layout, found_inf, score=score, top_k=top_k, all_reduce=all_reduce
        )
        with torch.profiler.record_function("MoLFAdamW.masked_update"):
            self.masked_update(
                params, exp_avgs, exp_avg_sqs, state_steps, mask, lrs, weight_decays, **hyper
            )
        return scores, selected


class Foreach(ThreePassStep):
    """The routed step on torch's foreach ops (every tensor type)."""

    name = "foreach"
    moments_and_scores = staticmethod(moments_and_scores)
    masked_update = staticmethod(masked_update)
    nonfinite = staticmethod(nonfinite)

    def supports(self, *tensor_lists: list[Tensor]) -> bool:
        return True
