r"""The routed step written out one tensor at a time in float64: the readable spec.

``MoLFAdamW(model, implementation="reference")`` runs it. It reads values on the host
(it synchronises with the device every step) and is slow: it is what the fast
implementations are checked against (``benchmarks/gpu_check.py`` on a GPU), not a way
to train. Moments are computed in float64 and stored in the state's dtype; scores and
updates use the stored moments, as the other implementations do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from molf.optim.functional import AllReduce, Layout


class Reference:
    """The routed step as the equations read (see :mod:`molf.optim`)."""

    name = "reference"
    fuses_routing = False

    def supports(self, *tensor_lists: list[Tensor]) -> bool:
        return True

    def nonfinite(self, grads: list[Tensor]) -> Tensor:
        bad = any(not bool(g.isfinite().all()) for g in grads)
        return torch.tensor(float(bad), device=grads[0].device)

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
        skip = bool(found_inf)
        cells = layout.cell_index.tolist()
        if not skip:
            _moments(grads, exp_avgs, exp_avg_sqs, state_steps, beta1, beta2)
        sums = torch.zeros(layout.num_cells, dtype=torch.float64, device=found_inf.device)
        for cell, m, v, lr in zip(cells, exp_avgs, exp_avg_sqs, lrs):
            sums[cell] += _score_sum(m, v, lr, eps, score)
        if all_reduce is not None:
            all_reduce(sums)
        # S_e = lr/N_e * sum(m^2/(sqrt(v)+eps))  or  sqrt(sum((m/(sqrt(v)+eps))^2) / N_e).
        scores = (sums / layout.cell_sizes.double()).view_as(layout.participating)
        if score == "pfn":
            scores = scores.sqrt()
        selected = torch.zeros_like(layout.participating)
        if not skip:
            _select(scores, layout.participating, top_k, selected)
        winning = selected.flatten().tolist()
        per_tensor = zip(cells, params, exp_avgs, exp_avg_sqs, state_steps, lrs, weight_decays)
        for cell, p, m, v, t, lr, wd in per_tensor:
            if winning[cell]:
                _adamw_update(p, m, v, float(t), lr, wd, beta1, beta2, eps)
        return scores, selected


def _moments(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    beta1: float,
    beta2: float,
) -> None:
    """1. Every expert's moments: m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, t <- t+1."""
    for g, m, v, t in zip(grads, exp_avgs, exp_avg_sqs, state_steps):
        g64 = g.double()
        m.copy_(beta1 * m.double() + (1.0 - beta1) * g64)
        v.copy_(beta2 * v.double() + (1.0 - beta2) * g64 * g64)
        t += 1


def _score_sum(m: Tensor, v: Tensor, lr: float, eps: float, score: str) -> Tensor:
    """2. One tensor's share of its cell's score sum, on the raw moments:
    ``lr * sum(m^2 / (sqrt(v) + eps))`` (EPD) or ``sum((m / (sqrt(v) + eps))^2)`` (PFN)."""
    ratio = m.double() / (v.double().sqrt() + eps)
    return lr * (m.double() * ratio).sum() if score == "epd" else (ratio**2).sum()


def _select(scores: Tensor, participating: Tensor, top_k: int, selected: Tensor) -> None:
    """3. Mark in ``selected`` each module's Top-K among its participating experts with
    a finite score (ties to the lower index)."""
    eligible_cells = participating.tolist()
    for module, row in enumerate(scores.tolist()):
        eligible = [e for e, s in enumerate(row) if eligible_cells[module][e] and math.isfinite(s)]
        ranked = sorted(eligible, key=lambda e: (-row[e], e))  # ties: lower index
        for e in ranked[:top_k]:
            selected[module, e] = True


def _adamw_update(
    p: Tensor,
    m: Tensor,
    v: Tensor,
    steps: float,
    lr: float,
    wd: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """4. A winner's AdamW update:
    ``p <- p (1 - lr wd) - lr * m_hat / (sqrt(v_hat) + eps)``, ``m_hat = m / (1 - b1^t)``."""
    m_hat = m.double() / (1.0 - beta1**steps)
    v_hat = v.double() / (1.0 - beta2**steps)
    p.copy_(p.double() * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps))
