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

and the others keep their weights (their moments still moved). A NaN or infinite
score never wins: a layer whose scores are all non-finite updates no expert (their
moments still move). Parameters outside MoLF layers get plain AdamW. A non-finite
gradient anywhere skips the whole step.

``betas`` and ``eps`` are shared by every parameter group (one pass serves them all):
changing them in every group (e.g. a momentum schedule) takes effect at the next step;
groups that disagree are refused. float16 parameters are refused (their moments
underflow; use bfloat16, float32 or float32 weights under autocast); float64 ones
train with float64 moments, updates and scores.

A step makes three passes over the experts, and no host-device synchronisation:

1. is any gradient non-finite (a 0-d ``found_inf`` tensor, never read on the host);
2. the moments of every expert (left alone when ``found_inf``), and per-tensor score
   partial sums, scattered into a ``[modules x experts]`` table;
3. Top-K routing as tensor ops on that table, then the AdamW update of the winners.

Parameters outside MoLF layers take torch's fused AdamW (gated by ``found_inf``).
Passes 2 and 3 have three implementations that compute the same thing (to float32
rounding): ``"foreach"`` (torch's ``_foreach`` ops on bounded buckets of tensors; any
device, dtype or tensor subclass), ``"cpu_kernel"`` (:mod:`molf._cpu_kernel`: C loops
that do passes 2 and 3 module by module while the moments are in the cache, and never
touch the losers' weights; float32 on the CPU; other dtypes use foreach) and ``"triton"``
(:mod:`molf._triton_kernel`: one kernel launch per pass over all tensors; float32 on a
GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _functional_adamw
from torch.profiler import record_function

from molf import _cpu_kernel
from molf.errors import MolfError
from molf.model import molf_modules

logger = logging.getLogger("molf")

IMPLEMENTATIONS = ("auto", "foreach", "cpu_kernel", "triton")
# Elements per bucket of the foreach path: bounds its temporaries (2 x 128 MiB in fp32).
FOREACH_BUCKET = 1 << 25


@dataclass
class Routing:
    """The routing decision of the last step (read by logs and plots, never recomputed)."""

    modules: list[str]
    experts: list[str]
    scores: Tensor  # float [modules, experts], on the parameters' device
    selected: Tensor  # bool [modules, experts]; all False on a skipped step


def select_top_k(scores: Tensor, participating: Tensor, k: int) -> Tensor:
    """Per row, the ``k`` highest finite scores among participating columns; ties go to
    the lower column index. A NaN or infinite score is never selected (a row without a
    finite score selects nothing). Sync-free: rank_i = #{j: s_j > s_i} + #{j < i: s_j = s_i}
    over the eligible columns, the others scoring -inf."""
    eligible = participating & scores.isfinite()
    s = scores.masked_fill(~eligible, float("-inf"))
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    n = s.shape[-1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=s.device).tril(-1)
    rank = (sj > si).sum(-1) + ((sj == si) & earlier).sum(-1)
    return (rank < k) & eligible


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


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor (a view), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _math_dtype(tensors: list[Tensor]) -> torch.dtype:
    """The dtype the foreach path reduces in and keeps its per-tensor coefficients in:
    float64 when a tensor is float64, else float32 (also for bfloat16 tensors)."""
    f64 = torch.float64
    return f64 if any(t.dtype is f64 for t in tensors) else torch.float32


def foreach_nonfinite(grads: list[Tensor]) -> Tensor:
    """A 0-d float32 tensor: 1 if any gradient holds a NaN or an infinity, else 0."""
    # Norms in each gradient's dtype (reduced in float32 or wider): a float32 `dtype`
    # cannot take float64 gradients.
    norms = torch._foreach_norm(grads, 2)
    return (~torch.stack(norms).sum().isfinite()).float()


def foreach_moments_and_scores(
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
    ``sum((m/(sqrt(v)+eps))^2)`` (PFN) over the new moments. ``[len(params)]``, fp32
    (fp64 when a tensor is fp64)."""
    if not params:
        return torch.zeros(0, dtype=torch.float32, device=found_inf.device)
    acc = _math_dtype(exp_avgs)
    # torch's fused kernel with lr=0 updates the moments in one pass and honours found_inf.
    _functional_adamw(
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


def foreach_masked_update(
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
    if not params:
        return
    # Per-tensor coefficients as [P] vectors; the bias corrections in float64, since
    # 1 - beta2^t loses digits in float32 (1e-5 relative for beta2=0.999, t=1). They
    # are applied in float32 (float64 for float64 tensors). A loser's coefficients are
    # chosen, not multiplied by 0, so that a NaN or infinite lr cannot reach its weights.
    acc = _math_dtype(params)
    t = torch.stack(state_steps).double().clamp_min(1.0)  # no 0/0 before the first step
    on = mask != 0
    ones = list(torch.ones_like(t).unbind())
    neg_step = torch.stack(torch._foreach_mul(list((1.0 / (beta1**t - 1.0)).unbind()), lrs))
    decay = torch.stack(
        torch._foreach_mul(ones, [1.0 - lr * wd for lr, wd in zip(lrs, weight_decays)])
    )
    neg_step = list(torch.where(on, neg_step, 0.0).to(acc).unbind())
    decay = list(torch.where(on, decay, 1.0).to(acc).unbind())
    bc2_sqrt = list((1.0 - beta2**t).sqrt().to(acc).unbind())
    for b in _buckets(params):
        denom = torch._foreach_sqrt(exp_avg_sqs[b])
        torch._foreach_div_(denom, bc2_sqrt[b])
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(exp_avgs[b], denom)
        del denom
        torch._foreach_mul_(update, neg_step[b])
        torch._foreach_mul_(params[b], decay[b])
        torch._foreach_add_(params[b], update)


_F16 = torch.float16
_F16_MESSAGE = (
    "MoLFAdamW: float16 parameters are not supported: use bf16 or fp32 (or amp: fp32 "
    "weights under torch.autocast(dtype=torch.float16)); float16 Adam moments underflow "
    "({} is float16)"
)


def _check_betas_eps(betas, eps) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise MolfError(f"MoLFAdamW: betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise MolfError(f"MoLFAdamW: eps must be a non-negative number, got {eps!r}")


class _ForeachPasses:
    """The foreach implementation of passes 1-3, with the Triton kernel's interface."""

    nonfinite = staticmethod(foreach_nonfinite)
    moments_and_scores = staticmethod(foreach_moments_and_scores)
    masked_update = staticmethod(foreach_masked_update)


@dataclass
class _Layout:
    """Where each parameter sits in the [modules x experts] table for one set of grads."""

    cell_index: Tensor  # long [P]: m * E + e for routed params, M * E for the others
    num_routed: int  # params[:num_routed] are MoLF experts, module by module; then the others
    cell_sizes: Tensor  # float [M * E]: N_e over the params with a gradient
    participating: Tensor  # bool [M, E]
    module_starts: Tensor  # long [M + 1], on the CPU: module m owns params[starts[m]:starts[m+1]]


@dataclass
class _Gathered:
    """The tensors a step works on, in kernel order, for one set of parameters with
    gradients (``signature``); kept between steps, since moments and steps are updated
    in place, and rebuilt when that set changes or the state is replaced."""

    signature: tuple[bool, ...]
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    group_of: list[int]  # each param's group index (lr and weight decay are read per step)
    layout: _Layout
    state_fits: dict[str, bool]  # per fast implementation: does the state (ours) suit it?


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW over a MoLF model with per-layer Top-K routing of the update.

    Parameter groups (built from the model, in this order): ``fft`` (base weights,
    ``weight_decay``), ``fft_bias`` (base biases, no decay), ``lora0``, ``lora1``, ...
    (``lora_lr``, ``lora_weight_decay``), ``other`` and ``other_no_decay`` (trainable
    parameters outside MoLF layers: plain AdamW at ``lr``; 1-D ones such as biases and
    norm weights get no decay). Any LR scheduler scales every group.

    ``implementation`` picks how the experts are updated (see the module docstring; the
    results agree to float32 rounding): ``"auto"`` (default) is ``"cpu_kernel"`` when
    the parameters are on the CPU and a C compiler can build it, ``"triton"`` on a GPU
    with Triton installed, else ``"foreach"``. A step whose tensors a
    kernel cannot take (another dtype, non-contiguous, a tensor subclass such as
    DTensor) uses foreach; :attr:`last_implementation` says which one ran.

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
        implementation: str = "auto",
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
        _check_betas_eps(betas, eps)
        if implementation not in IMPLEMENTATIONS:
            raise MolfError(
                f"MoLFAdamW: implementation must be one of {IMPLEMENTATIONS}, "
                f"got {implementation!r}"
            )

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
        half = next(
            (n for n, p in model.named_parameters() if p.requires_grad and p.dtype == _F16), None
        )
        if half is not None:
            raise MolfError(_F16_MESSAGE.format(half))
        devices = {p.device for g in groups for p in g["params"]}
        if len(devices) > 1:
            raise MolfError(
                f"MoLFAdamW needs all trainable parameters on one device, got {devices}"
            )
        super().__init__(
            groups, {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}
        )
        self._cells = cells
        self.implementation = implementation
        self._skipped = torch.zeros((), dtype=torch.int64)
        self._use_device(devices.pop())
        self._skip_event: torch.cuda.Event | None = None
        self._skips_reported = 0
        self.score_sums_hook: Callable[[Tensor], None] | None = None
        self.last_routing: Routing | None = None
        self.last_implementation: str | None = None  # which implementation the last step used
        self.register_load_state_dict_post_hook(MoLFAdamW._steps_to_device)

    def _use_device(self, device: torch.device) -> None:
        """Put the optimizer's own tensors (skip counter, layouts) on ``device`` and pick
        the implementation for it. Runs at construction and again when the parameters
        have moved (e.g. built on the CPU, then the Trainer moves the model to CUDA), as
        torch's optimizers create their state on the parameters' device."""
        implementation = self.implementation
        self._device = device
        self._gathered: _Gathered | None = None
        self._cpu_kernel = None
        self._triton = None
        if implementation in ("auto", "cpu_kernel") and device.type == "cpu":
            self._cpu_kernel = _cpu_kernel.load()
        if implementation == "cpu_kernel" and self._cpu_kernel is None:
            raise MolfError(
                "MoLFAdamW(implementation='cpu_kernel') needs the parameters on the CPU and "
                "a C compiler (cc/gcc on PATH, or $CC) to build molf's kernel; use 'auto' "
                "or 'foreach'"
            )
        if implementation == "triton":
            try:
                from molf import _triton_kernel
            except ImportError as exc:
                raise MolfError(
                    f"MoLFAdamW(implementation='triton') needs Triton ({exc}); use 'auto'"
                ) from exc
            self._triton = _triton_kernel.load()
        elif implementation == "auto" and device.type == "cuda":
            # Checked on an H200 (benchmarks/gpu_check.py): equal to the reference, no
            # sync, 1.37x fused AdamW against foreach's 4.8x at Qwen2.5-1.5B shapes.
            try:
                from molf import _triton_kernel

                self._triton = _triton_kernel.load()
            except ImportError:
                self._triton = None
        self._skipped = self._skipped.to(device)
        self._skipped_host = torch.zeros((), dtype=torch.int64, pin_memory=device.type == "cuda")

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, refusing a group whose ``betas`` or ``eps`` differ from the
        others' (MoLFAdamW has one of each for all groups)."""
        super().add_param_group(param_group)
        self._gathered = None
        try:
            self._betas_eps()
        except MolfError:
            self.param_groups.pop()
            raise

    def _betas_eps(self) -> tuple[float, float, float]:
        """``beta1, beta2, eps``, the same in every group (checked every step: a few
        Python comparisons, no tensor read)."""
        seen = {(*(float(b) for b in g["betas"]), float(g["eps"])) for g in self.param_groups}
        if len(seen) != 1:
            by_group = {
                g.get("name", i): (g["betas"], g["eps"]) for i, g in enumerate(self.param_groups)
            }
            raise MolfError(
                "MoLFAdamW: every parameter group must have the same betas and eps (one "
                f"pass updates the moments of all), got {by_group}"
            )
        ((beta1, beta2, eps),) = seen
        _check_betas_eps((beta1, beta2), eps)
        return beta1, beta2, eps

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
        self._gathered = None  # new state tensors: gather them again
        self._skipped.fill_(skipped)
        self._skips_reported = skipped

    @staticmethod
    def _steps_to_device(self: MoLFAdamW) -> None:
        for p, st in self.state.items():
            if "step" in st:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    def _layout(self, params: list[Tensor]) -> _Layout:
        """Where each of ``params`` (in kernel order) sits in the [modules x experts]
        table; built when the parameters are gathered."""
        num_cells = len(self._modules) * len(self._experts)
        idx = [self._cells.get(id(p), num_cells) for p in params]
        sizes = torch.zeros(num_cells + 1, dtype=torch.float32)
        for i, p in zip(idx, params):
            sizes[i] += p.numel()
        num_routed = sum(i < num_cells for i in idx)
        shape = (len(self._modules), len(self._experts))
        firsts = torch.arange(len(self._modules) + 1) * len(self._experts)
        return _Layout(
            cell_index=torch.tensor(idx, device=self._device),
            num_routed=num_routed,
            cell_sizes=sizes[:num_cells].clamp_min(1.0).to(self._device),
            participating=(sizes[:num_cells] > 0).view(shape).to(self._device),
            module_starts=torch.searchsorted(torch.tensor(idx[:num_routed]), firsts),
        )

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, grad_norm: Tensor | None = None
    ) -> float | None:
        """One step. ``grad_norm`` (the total gradient norm, e.g. what
        ``clip_grad_norm_`` returned) replaces the optimizer's own non-finite check; under
        FSDP2 it is the global norm, so every rank skips (or not) alike."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        beta1, beta2, eps = self._betas_eps()
        self._poll_skips()
        signature = tuple(p.grad is not None for g in self.param_groups for p in g["params"])
        if not any(signature):
            return loss
        gathered = self._gathered
        if gathered is None or gathered.signature != signature:
            gathered = self._gathered = self._gather(signature)
        params = gathered.params
        if params[0].device != self._device:  # the model moved after construction
            self._use_device(params[0].device)
            gathered = self._gathered = self._gather(signature)
            params = gathered.params
        grads = [p.grad for p in params]
        exp_avgs, exp_avg_sqs, steps = gathered.exp_avgs, gathered.exp_avg_sqs, gathered.steps
        group_lr = [float(g["lr"]) for g in self.param_groups]
        group_wd = [float(g["weight_decay"]) for g in self.param_groups]
        lrs = [group_lr[i] for i in gathered.group_of]
        wds = [group_wd[i] for i in gathered.group_of]
        layout = gathered.layout
        if _is_dtensor(params[0]):  # FSDP2: work on this rank's shards
            params, grads, exp_avgs, exp_avg_sqs = (
                [_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
            )
        r = layout.num_routed
        hyper = dict(beta1=beta1, beta2=beta2, eps=eps)
        impl = self._pick(gathered, grads)
        self.last_implementation = impl
        rp, rg, rm, rv, rs = params[:r], grads[:r], exp_avgs[:r], exp_avg_sqs[:r], steps[:r]
        passes = {"cpu_kernel": self._cpu_kernel, "triton": self._triton}.get(impl, _ForeachPasses)

        # Pass 1: is any gradient non-finite? One read of every gradient. (The named
        # ranges show up in torch.profiler: the kernels themselves are opaque to it.)
        with record_function("MoLFAdamW.nonfinite"):
            if grad_norm is not None:
                found_inf = (~torch.isfinite(_local(grad_norm).float())).float().reshape(())
            else:
                found_inf = passes.nonfinite(grads)
                if self.score_sums_hook is not None:  # a shard's NaN must skip every rank
                    self.score_sums_hook(found_inf)
                    found_inf = found_inf.clamp_max(1.0)
        keep = 1.0 - found_inf
        if impl == "cpu_kernel":
            # Passes 2 and 3 fused, module by module (see molf._cpu_kernel).
            with record_function("MoLFAdamW.cpu_kernel_step"):
                scores, selected = self._cpu_kernel.step(
                    rp,
                    rg,
                    rm,
                    rv,
                    rs,
                    lrs[:r],
                    wds[:r],
                    found_inf,
                    cells=layout.cell_index[:r],
                    module_starts=layout.module_starts,
                    cell_sizes=layout.cell_sizes,
                    participating=layout.participating,
                    top_k=self.top_k,
                    pfn=self.score == "pfn",
                    **hyper,
                )
            scores = scores.view_as(layout.participating)
            selected = selected.view_as(layout.participating)
        else:
            # Pass 2: moments of every expert and its score partial sums.
            with record_function("MoLFAdamW.moments_and_scores"):
                partial = passes.moments_and_scores(
                    rp, rg, rm, rv, rs, lrs[:r], found_inf, score=self.score, **hyper
                )
            num_cells = layout.cell_sizes.numel()
            sums = torch.zeros(num_cells, dtype=partial.dtype, device=partial.device)
            sums.index_add_(0, layout.cell_index[:r], partial)
            if self.score_sums_hook is not None:
                self.score_sums_hook(sums)
            # Pass 3: routing on the [modules x experts] table, then the winners' update.
            scores = sums / layout.cell_sizes
            if self.score == "pfn":
                scores = scores.sqrt()
            scores = scores.view_as(layout.participating)
            selected = select_top_k(scores, layout.participating, self.top_k) & keep.bool()
            mask = torch.cat([selected.flatten().float(), keep.view(1)])[layout.cell_index]
            with record_function("MoLFAdamW.masked_update"):
                passes.masked_update(rp, rm, rv, rs, mask[:r], lrs[:r], wds[:r], **hyper)
        with record_function("MoLFAdamW.plain_adamw"):
            self._plain_adamw(
                params[r:],
                grads[r:],
                exp_avgs[r:],
                exp_avg_sqs[r:],
                steps[r:],
                lrs[r:],
                wds[r:],
                found_inf,
                **hyper,
            )
        self._skipped += found_inf.long()
        self._publish_skips()
        self.last_routing = Routing(self._modules, self._experts, scores, selected)
        return loss

    def _pick(self, gathered: _Gathered, grads: list[Tensor]) -> str:
        """The implementation for this step's tensors. A kernel must never be handed a
        tensor it cannot work on in place: the optimizer's own state was checked when
        gathered (only it creates or replaces those tensors); parameters (whose data a
        user may swap, e.g. ``model.to(dtype)``) and gradients are checked every step."""
        if (
            self._cpu_kernel is not None
            and self.score_sums_hook is None  # the hook sits between passes 2 and 3
            and gathered.state_fits["cpu_kernel"]
            and _cpu_kernel.supports(gathered.params, grads)
        ):
            return "cpu_kernel"
        if self._triton is not None and gathered.state_fits["triton"]:
            from molf import _triton_kernel

            if _triton_kernel.supports(gathered.params, grads):
                return "triton"
        return "foreach"

    def _gather(self, signature: tuple[bool, ...]) -> _Gathered:
        """Order the parameters with gradients for the kernels (routed experts module by
        module, then the others), creating their state on first use."""
        routed, plain = [], []  # (param, group index)
        flat = 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if signature[flat]:
                    (routed if id(p) in self._cells else plain).append((p, g))
                flat += 1
        routed.sort(key=lambda item: self._cells[id(item[0])])  # module by module (stable)
        order = routed + plain
        for p, _ in order:
            st = self.state[p]
            if not st:
                if p.dtype == _F16:
                    raise MolfError(_F16_MESSAGE.format(f"a parameter of shape {tuple(p.shape)}"))
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        params = [p for p, _ in order]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        steps = [self.state[p]["step"] for p in params]
        state = (exp_avgs, exp_avg_sqs, steps)
        fits = {"cpu_kernel": self._cpu_kernel is not None and _cpu_kernel.supports(*state)}
        fits["triton"] = False
        if self._triton is not None:
            from molf import _triton_kernel

            fits["triton"] = _triton_kernel.supports(*state)
        return _Gathered(
            signature=signature,
            params=params,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            steps=steps,
            group_of=[g for _, g in order],
            layout=self._layout(params),
            state_fits=fits,
        )

    @staticmethod
    def _plain_adamw(
        params, grads, exp_avgs, exp_avg_sqs, steps, lrs, wds, found_inf, **hyper
    ) -> None:
        """torch's fused AdamW on the parameters outside MoLF layers, one call per
        (lr, weight decay); skipped, step counts included, when ``found_inf``."""
        by_hyper: dict[tuple[float, float], list[int]] = {}
        for i, lw in enumerate(zip(lrs, wds)):
            by_hyper.setdefault(lw, []).append(i)
        for (lr, wd), idx in by_hyper.items():
            _functional_adamw(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [exp_avgs[i] for i in idx],
                [exp_avg_sqs[i] for i in idx],
                [],
                [steps[i] for i in idx],
                fused=True,
                found_inf=found_inf,
                amsgrad=False,
                lr=lr,
                weight_decay=wd,
                maximize=False,
                **hyper,
            )

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
