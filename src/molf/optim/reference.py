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
        device = found_inf.device
        # 1. Every expert's moments: m <- b1 m + (1-b1) g, v <- b2 v + (1-b2) g^2, t <- t+1.
        if not skip:
            for g, m, v, t in zip(grads, exp_avgs, exp_avg_sqs, state_steps):
                g64 = g.double()
                m.copy_(beta1 * m.double() + (1.0 - beta1) * g64)
                v.copy_(beta2 * v.double() + (1.0 - beta2) * g64 * g64)
                t += 1
        # 2. Score sums per [module, expert] cell, on the raw moments.
        sums = torch.zeros(layout.num_cells, dtype=torch.float64, device=device)
        for cell, m, v, lr in zip(cells, exp_avgs, exp_avg_sqs, lrs):
            ratio = m.double() / (v.double().sqrt() + eps)
            sums[cell] += lr * (m.double() * ratio).sum() if score == "epd" else (ratio**2).sum()
        if all_reduce is not None:
            all_reduce(sums)
        # S_e = lr/N_e * sum(m^2/(sqrt(v)+eps))  or  sqrt(sum((m/(sqrt(v)+eps))^2) / N_e).
        scores = (sums / layout.cell_sizes.double()).view_as(layout.participating)
        if score == "pfn":
            scores = scores.sqrt()
        # 3. Each module's Top-K among its participating experts with a finite score.
        selected = torch.zeros_like(layout.participating)
        if not skip:
            participating = layout.participating.tolist()
            for module, row in enumerate(scores.tolist()):
                eligible = [
                    e for e, s in enumerate(row) if participating[module][e] and math.isfinite(s)
                ]
                ranked = sorted(eligible, key=lambda e: (-row[e], e))  # ties: lower index
                for e in ranked[:top_k]:
                    selected[module, e] = True
        # 4. The winners' AdamW update:
        #    p <- p (1 - lr wd) - lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - b1^t).
        winning = selected.flatten().tolist()
        for cell, p, m, v, t, lr, wd in zip(
            cells, params, exp_avgs, exp_avg_sqs, state_steps, lrs, weight_decays
        ):
            if not winning[cell]:
                continue
            steps = float(t)
            m_hat = m.double() / (1.0 - beta1**steps)
            v_hat = v.double() / (1.0 - beta2**steps)
            p.copy_(p.double() * (1.0 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps))
        return scores, selected
