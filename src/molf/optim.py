r"""MoLFAdamW: AdamW whose update each MoLF layer routes to its Top-K experts.

For every expert ``e`` (the FFT expert ``W, b`` or a LoRA expert ``A_i, B_i``) of
every MoLF layer, each step:

.. math::
    m_e &\leftarrow \beta_1 m_e + (1-\beta_1) g_e, \qquad
    v_e \leftarrow \beta_2 v_e + (1-\beta_2) g_e^2, \qquad t_e \leftarrow t_e + 1 \\
    S_e^{EPD} &= \frac{\mathrm{lr}_e}{N_e} \sum \frac{m_e^2}{\sqrt{v_e} + \epsilon}, \qquad
    S_e^{PFN} = \sqrt{\frac{1}{N_e} \sum \Big(\frac{m_e}{\sqrt{v_e} + \epsilon}\Big)^2}

with raw (not bias-corrected) moments and ``N_e`` the expert's parameter count. In
each layer the ``top_k`` experts with the highest score (ties to the lower index,
FFT first) take the AdamW update

.. math::
    \theta \leftarrow \theta (1 - \mathrm{lr}\,\lambda)
        - \mathrm{lr} \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

and the others keep their weights (their moments still moved). Parameters outside
MoLF layers get plain AdamW. A non-finite gradient anywhere skips the whole step.

The step makes no host-device synchronisation: moments are updated by torch's fused
AdamW kernel (``lr=0``, so weights do not move, and its ``found_inf`` skips a bad
step), scores are per-tensor foreach reductions scattered into a
``[modules x experts]`` table, routing is tensor ops on that table, and the update
is masked per tensor by the routing decision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _functional_adamw

from molf.errors import MolfError
from molf.model import molf_modules

logger = logging.getLogger("molf")


@dataclass
class Routing:
    """The routing decision of the last step (read by logs and plots, never recomputed)."""

    modules: list[str]
    experts: list[str]
    scores: Tensor  # float [modules, experts], on the parameters' device
    selected: Tensor  # bool [modules, experts]; all False on a skipped step


def select_top_k(scores: Tensor, participating: Tensor, k: int) -> Tensor:
    """Per row, the ``k`` highest scores among participating columns; ties go to the
    lower column index. Sync-free: rank_i = #{j: s_j > s_i} + #{j < i: s_j = s_i}."""
    s = scores.masked_fill(~participating, float("-inf"))
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    n = s.shape[-1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=s.device).tril(-1)
    rank = (sj > si).sum(-1) + ((sj == si) & earlier).sum(-1)
    return (rank < k) & participating


def molf_scores(
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    lrs: list[float],
    cell_index: Tensor,
    num_cells: int,
    *,
    score: str,
    eps: float,
) -> Tensor:
    """Per-cell score sums ``sum(m^2/(sqrt(v)+eps))`` (times lr, for EPD) or
    ``sum((m/(sqrt(v)+eps))^2)`` (PFN), before division by ``N_e``. fp32, ``[num_cells]``."""
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if score == "epd":
        ratio = torch._foreach_mul(exp_avgs, exp_avgs)
        torch._foreach_div_(ratio, denom)
        partial = torch._foreach_mul(torch._foreach_norm(ratio, 1, dtype=torch.float32), lrs)
    else:
        ratio = torch._foreach_div(exp_avgs, denom)
        partial = torch._foreach_norm(ratio, 2, dtype=torch.float32)
        torch._foreach_mul_(partial, partial)
    sums = torch.zeros(num_cells, dtype=torch.float32, device=cell_index.device)
    return sums.index_add_(0, cell_index, torch.stack(partial))


def masked_adamw_update(
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
    """The bias-corrected AdamW update with decoupled weight decay, applied to
    ``params[i]`` where ``mask[i]`` is 1 and leaving it unchanged where 0.
    The moments and step counts must already include this step's gradient."""
    # Per-tensor coefficients as [P] vectors; the bias corrections in float64, since
    # 1 - beta2^t loses digits in float32 (1e-5 relative for beta2=0.999, t=1).
    t = torch.stack(state_steps).double().clamp_min(1.0)  # no 0/0 before the first step
    mask64 = mask.double()
    neg_step = torch._foreach_mul(list((mask64 / (beta1**t - 1.0)).unbind()), lrs)
    bc2_sqrt = list((1.0 - beta2**t).sqrt().float().unbind())
    decay = torch._foreach_mul(
        list(mask64.unbind()), [-lr * wd for lr, wd in zip(lrs, weight_decays)]
    )
    torch._foreach_add_(decay, 1.0)
    neg_step = list(torch.stack(neg_step).float().unbind())
    decay = list(torch.stack(decay).float().unbind())
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(update, neg_step)
    torch._foreach_mul_(params, decay)
    torch._foreach_add_(params, update)


@dataclass
class _Layout:
    """Where each parameter sits in the [modules x experts] table for one set of grads."""

    cell_index: Tensor  # long [P]: m * E + e for routed params, M * E for the others
    num_routed: int  # params[:num_routed] are MoLF experts, the rest plain AdamW
    cell_sizes: Tensor  # float [M * E]: N_e over the params with a gradient
    participating: Tensor  # bool [M, E]


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW over a MoLF model with per-layer Top-K routing of the update.

    Parameter groups (built from the model, in this order): ``fft`` (base weights,
    ``weight_decay``), ``fft_bias`` (base biases, no decay), ``lora0``, ``lora1``, ...
    (``lora_lr``, ``lora_weight_decay``), ``other`` and ``other_no_decay`` (trainable
    parameters outside MoLF layers: plain AdamW at ``lr``; 1-D ones such as biases and
    norm weights get no decay). Any LR scheduler scales every group.

    ``top_k`` and ``score`` come from ``model.molf_config``. After each step,
    :attr:`last_routing` holds the scores and winners, and :attr:`skipped_steps`
    counts steps skipped for non-finite gradients (reading it synchronises).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        lora_lr: float | None = None,
        weight_decay: float = 0.01,
        lora_weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        config = getattr(model, "molf_config", None)
        layers = list(molf_modules(model))
        if config is None or not layers:
            raise MolfError(
                "MoLFAdamW needs a model with MoLF layers: call get_molf_model(model, "
                "MoLFConfig(...)) first"
            )
        lora_lr = lr if lora_lr is None else lora_lr
        lora_weight_decay = weight_decay if lora_weight_decay is None else lora_weight_decay
        for name, value in (
            ("lr", lr),
            ("lora_lr", lora_lr),
            ("eps", eps),
            ("weight_decay", weight_decay),
            ("lora_weight_decay", lora_weight_decay),
        ):
            if not isinstance(value, (int, float)) or value < 0:
                raise MolfError(f"MoLFAdamW: {name} must be a non-negative number, got {value!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise MolfError(f"MoLFAdamW: betas must be in [0, 1), got {betas!r}")

        self.top_k, self.score = config.top_k, config.score
        self._modules = [name for name, _ in layers]
        self._experts = config.expert_names
        num_lora = len(config.lora_ranks)
        fft = int(config.train_base)
        cells: dict[int, int] = {}  # id(param) -> m * E + e
        buckets: dict[str, list[Tensor]] = {
            k: [] for k in ["fft", "fft_bias", *[f"lora{i}" for i in range(num_lora)]]
        }
        num_e = len(self._experts)
        for m, (_, layer) in enumerate(layers):
            base = layer.base_layer
            for key, p in (("fft", base.weight), ("fft_bias", base.bias)):
                if p is not None and p.requires_grad and fft:
                    buckets[key].append(p)
                    cells[id(p)] = m * num_e
            for i in range(num_lora):
                for p in (layer.lora_A[i], layer.lora_B[i]):
                    if p.requires_grad:
                        buckets[f"lora{i}"].append(p)
                        cells[id(p)] = m * num_e + fft + i
        inside = {id(p) for _, layer in layers for p in layer.parameters()}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in inside]
        buckets["other"] = [p for p in others if p.ndim >= 2]
        buckets["other_no_decay"] = [p for p in others if p.ndim < 2]
        hyper = {
            "fft": (lr, weight_decay),
            "fft_bias": (lr, 0.0),
            "other": (lr, weight_decay),
            "other_no_decay": (lr, 0.0),
        }
        groups = [
            {
                "params": ps,
                "name": key,
                "lr": hyper.get(key, (lora_lr, lora_weight_decay))[0],
                "weight_decay": hyper.get(key, (lora_lr, lora_weight_decay))[1],
            }
            for key, ps in buckets.items()
            if ps
        ]
        devices = {p.device for g in groups for p in g["params"]}
        if len(devices) > 1:
            raise MolfError(
                f"MoLFAdamW needs all trainable parameters on one device, got {devices}"
            )
        super().__init__(
            groups, {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}
        )
        self._cells = cells
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self._device = devices.pop()
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)
        self._skipped_host = torch.zeros(
            (), dtype=torch.int64, pin_memory=self._device.type == "cuda"
        )
        self._skip_event: torch.cuda.Event | None = None
        self._skips_reported = 0
        self.score_sums_hook: Callable[[Tensor], None] | None = None
        self.last_routing: Routing | None = None
        self.register_load_state_dict_post_hook(MoLFAdamW._steps_to_device)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (synchronises with the device)."""
        return int(self._skipped)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)
        self._skipped.fill_(skipped)
        self._skips_reported = skipped

    @staticmethod
    def _steps_to_device(self: MoLFAdamW) -> None:
        for p, st in self.state.items():
            if "step" in st:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    def _layout(self, key: tuple[int, ...], params: list[Tensor]) -> _Layout:
        layout = self._layouts.get(key)
        if layout is None:
            num_cells = len(self._modules) * len(self._experts)
            idx = [self._cells.get(id(p), num_cells) for p in params]
            sizes = torch.zeros(num_cells + 1, dtype=torch.float32)
            for i, p in zip(idx, params):
                sizes[i] += p.numel()
            num_routed = sum(i < num_cells for i in idx)
            shape = (len(self._modules), len(self._experts))
            layout = _Layout(
                cell_index=torch.tensor(idx, device=self._device),
                num_routed=num_routed,
                cell_sizes=sizes[:num_cells].clamp_min(1.0).to(self._device),
                participating=(sizes[:num_cells] > 0).view(shape).to(self._device),
            )
            self._layouts[key] = layout
        return layout

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._poll_skips()
        key: list[int] = []
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        lrs, wds = [], []
        flat = 0
        routed, plain = [], []  # routed MoLF experts first, then the others
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (routed if id(p) in self._cells else plain).append((p, group, flat))
                flat += 1
        for p, group, i in routed + plain:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            key.append(i)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
            lrs.append(float(group["lr"]))
            wds.append(float(group["weight_decay"]))
        if not params:
            return loss
        layout = self._layout(tuple(key), params)
        beta1, beta2 = self.defaults["betas"]
        eps = self.defaults["eps"]

        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        found_inf = (~torch.stack(norms).sum().isfinite()).float()
        # Moments and step counts of every expert; lr=0 leaves the weights untouched.
        _functional_adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
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
        r = layout.num_routed
        num_cells = layout.cell_sizes.numel()
        sums = molf_scores(
            exp_avgs[:r],
            exp_avg_sqs[:r],
            lrs[:r],
            layout.cell_index[:r],
            num_cells,
            score=self.score,
            eps=eps,
        )
        if self.score_sums_hook is not None:
            self.score_sums_hook(sums)
        scores = sums / layout.cell_sizes
        if self.score == "pfn":
            scores = scores.sqrt()
        scores = scores.view_as(layout.participating)
        keep = 1.0 - found_inf
        selected = select_top_k(scores, layout.participating, self.top_k) & keep.bool()
        mask = torch.cat([selected.flatten().float(), keep.view(1)])[layout.cell_index]
        masked_adamw_update(
            params, exp_avgs, exp_avg_sqs, steps, mask, lrs, wds, beta1=beta1, beta2=beta2, eps=eps
        )
        self._skipped += found_inf.long()
        self._publish_skips()
        self.last_routing = Routing(self._modules, self._experts, scores, selected)
        return loss

    def _publish_skips(self) -> None:
        """Copy the skip counter to the host without waiting for the device."""
        if self._device.type == "cuda":
            self._skipped_host.copy_(self._skipped, non_blocking=True)
            self._skip_event = torch.cuda.Event()
            self._skip_event.record()
        else:
            self._skipped_host = self._skipped
            self._poll_skips()

    def _poll_skips(self) -> None:
        """Warn about newly skipped steps once the host copy has landed."""
        if self._skip_event is not None and not self._skip_event.query():
            return
        count = int(self._skipped_host)
        if count > self._skips_reported:
            logger.warning(
                "MoLFAdamW skipped %d step(s) with a non-finite gradient (%d in all): no "
                "weight or moment changed",
                count - self._skips_reported,
                count,
            )
            self._skips_reported = count
