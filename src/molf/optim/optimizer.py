"""MoLFAdamW: its state, and one routed step per call (the maths: :mod:`molf.optim`).

The optimizer gathers the tensors with gradients in kernel order (routed experts module
by module, then the others), creating their state on first use, and keeps them between
steps; each step picks an implementation for them, finds ``found_inf``, runs the routed
step on the experts and torch's fused AdamW on the rest. Its parameter groups come from
:mod:`molf.optim.groups`, its checks from :mod:`molf.optim.validation`, its kernel from
:mod:`molf.optim.implementations`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as functional_adamw
from torch.profiler import record_function

from molf import defaults
from molf.errors import MolfError
from molf.model import molf_modules
from molf.optim.functional import AllReduce, Layout, RoutedStep, Routing, is_dtensor, local_shard
from molf.optim.groups import layout, param_groups
from molf.optim.implementations import FOREACH, REFERENCE, fast_implementation
from molf.optim.skips import SkipCounter
from molf.optim.validation import (
    FLOAT16_MESSAGE,
    check_betas_eps,
    check_hyperparameters,
    check_no_float16,
    check_param_state,
    check_state_dict,
)


@dataclass
class _Gathered:
    """The tensors a step works on, in kernel order (routed experts module by module,
    then the others), for one set of parameters with gradients (``signature``); kept
    between steps, since moments and steps are updated in place, and rebuilt when that
    set changes or the state is replaced."""

    signature: tuple[bool, ...]
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    group_of: list[int]  # each param's group index (lr and weight decay are read per step)
    num_routed: int  # params[:num_routed] are MoLF experts
    layout: Layout
    state_fits_kernel: bool  # does the optimizer's state suit the fast implementation?


class MoLFAdamW(torch.optim.Optimizer):
    """AdamW over a MoLF model with per-layer Top-K routing of the update.

    Parameter groups (built from the model, in this order): ``fft`` (base weights,
    ``weight_decay``), ``fft_bias`` (base biases, no decay), ``lora0``, ``lora1``, ...
    (``lora_lr``, ``lora_weight_decay``), ``other`` and ``other_no_decay`` (trainable
    parameters outside MoLF layers: plain AdamW at ``lr``; 1-D ones such as biases and
    norm weights get no decay). Any LR scheduler scales every group.

    ``implementation`` picks the routed step (see :mod:`molf.optim`; the results agree
    to float32 rounding): ``"auto"`` (default) is ``"cpu_kernel"`` when the parameters
    are on the CPU and a C compiler can build it, ``"triton"`` on a GPU with Triton
    installed, else ``"foreach"``. A step whose tensors a kernel cannot take (another
    dtype, non-contiguous, a tensor subclass such as DTensor) uses foreach;
    ``"reference"`` is the slow float64 spec. :attr:`last_implementation` says which
    one ran.

    ``top_k`` and ``score`` come from ``model.molf_config``. After each step,
    :attr:`last_routing` holds the scores and winners, and :attr:`skipped_steps`
    counts steps skipped for non-finite gradients (reading it synchronises).
    :attr:`all_reduce_hook` (``None``, or e.g. ``torch.distributed.all_reduce`` under
    FSDP2, where each rank holds a shard of every expert) sums, in place across ranks,
    the non-finite flag and the per-expert score sums, so every rank skips and routes
    alike.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        lora_lr: float | None = None,
        weight_decay: float = defaults.WEIGHT_DECAY,
        lora_weight_decay: float | None = None,
        betas: tuple[float, float] = defaults.BETAS,
        eps: float = defaults.EPS,
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
        check_hyperparameters(
            implementation,
            betas,
            eps,
            dict(
                lr=lr,
                lora_lr=lora_lr,
                weight_decay=weight_decay,
                lora_weight_decay=lora_weight_decay,
            ),
        )
        check_no_float16(model)
        self.top_k, self.score = config.top_k, config.score
        self._names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self._modules = [name for name, _ in layers]
        self._experts = config.expert_names
        groups, self._cells = param_groups(
            model, layers, lr, lora_lr, weight_decay, lora_weight_decay
        )
        devices = {p.device for g in groups for p in g["params"]}
        if len(devices) > 1:
            raise MolfError(
                f"MoLFAdamW needs all trainable parameters on one device, got {devices}"
            )
        super().__init__(
            groups, {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}
        )
        self.implementation = implementation
        device = devices.pop()
        self._skips = SkipCounter(device)
        self._use_device(device)
        self.all_reduce_hook: AllReduce | None = None
        self.last_routing: Routing | None = None
        self.last_implementation: str | None = None  # which implementation the last step used
        self.register_load_state_dict_post_hook(MoLFAdamW._steps_to_device)

    def _use_device(self, device: torch.device) -> None:
        """Put the optimizer's own tensors (skip counter, layout) on ``device`` and pick
        the implementation for it. Runs at construction and again when the parameters
        have moved (e.g. built on the CPU, then the Trainer moves the model to CUDA), as
        torch's optimizers create their state on the parameters' device."""
        self._device = device
        self._gathered: _Gathered | None = None
        self._kernel = fast_implementation(self.implementation, device)
        self._skips.to(device)

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
        check_betas_eps((beta1, beta2), eps)
        return beta1, beta2, eps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (synchronises with the device)."""
        return self._skips.total

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, after :func:`~molf.optim.validation.check_state_dict`: a state
        that does not fit this optimizer raises :class:`MolfError` and leaves the
        optimizer as it was."""
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        check_state_dict(self.param_groups, self._names, state_dict)
        super().load_state_dict(state_dict)
        self._gathered = None  # new state tensors: gather them again
        self._skips.load(skipped)

    @staticmethod
    def _steps_to_device(self: MoLFAdamW) -> None:
        for p, st in self.state.items():
            if "step" in st:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], float] | None = None, grad_norm: Tensor | None = None
    ) -> float | None:
        """One step: gather the tensors with gradients, check them for non-finite
        values, run the routed step on the experts and fused AdamW on the rest.
        ``grad_norm`` (the total gradient norm, e.g. what ``clip_grad_norm_`` returned)
        replaces the optimizer's own non-finite check; under FSDP2 it is the global
        norm, so every rank skips (or not) alike."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        beta1, beta2, eps = self._betas_eps()
        self._skips.poll()
        gathered = self._gather()
        if gathered is None:
            return loss
        params, exp_avgs, exp_avg_sqs = gathered.params, gathered.exp_avgs, gathered.exp_avg_sqs
        grads = [p.grad for p in params]
        impl = self._pick(gathered, grads)
        self.last_implementation = impl.name
        if is_dtensor(params[0]):  # FSDP2: work on this rank's shards
            params, grads, exp_avgs, exp_avg_sqs = (
                [local_shard(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
            )
        group_lr = [float(g["lr"]) for g in self.param_groups]
        group_wd = [float(g["weight_decay"]) for g in self.param_groups]
        lrs = [group_lr[i] for i in gathered.group_of]
        wds = [group_wd[i] for i in gathered.group_of]
        tensors = (params, grads, exp_avgs, exp_avg_sqs, gathered.steps, lrs, wds)
        r = gathered.num_routed
        # The named ranges show up in torch.profiler: the kernels are opaque to it.
        with record_function("MoLFAdamW.nonfinite"):
            found_inf = self._nonfinite(impl, grads, grad_norm)
        with record_function(f"MoLFAdamW.routed_step.{impl.name}"):
            scores, selected = impl.routed_step(
                *(t[:r] for t in tensors),
                gathered.layout,
                found_inf,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                score=self.score,
                top_k=self.top_k,
                all_reduce=self.all_reduce_hook,
            )
        with record_function("MoLFAdamW.plain_adamw"):
            _plain_adamw(*(t[r:] for t in tensors), found_inf, beta1=beta1, beta2=beta2, eps=eps)
        self._skips.add(found_inf)
        self.last_routing = Routing(self._modules, self._experts, scores, selected)
        return loss

    def _nonfinite(self, impl: RoutedStep, grads: list[Tensor], grad_norm: Tensor | None) -> Tensor:
        """``found_inf``: 1.0 when this step must be skipped, the same on every rank."""
        if grad_norm is not None:
            return (~torch.isfinite(local_shard(grad_norm).float())).float().reshape(())
        found_inf = impl.nonfinite(grads)
        if self.all_reduce_hook is not None:  # a shard's NaN must skip every rank
            self.all_reduce_hook(found_inf)
            found_inf = found_inf.clamp_max(1.0)
        return found_inf

    def _pick(self, gathered: _Gathered, grads: list[Tensor]) -> RoutedStep:
        """The implementation for this step's tensors. A kernel must never be handed a
        tensor it cannot work on in place: the optimizer's own state was checked when
        gathered (only it creates or replaces those tensors); parameters (whose data a
        user may swap, e.g. ``model.to(dtype)``) and gradients are checked every step."""
        if self.implementation == "reference":
            return REFERENCE
        kernel = self._kernel
        if (
            kernel is not None
            and gathered.state_fits_kernel
            and not (kernel.fuses_routing and self.all_reduce_hook is not None)
            and kernel.supports(gathered.params, grads)
        ):
            return kernel
        return FOREACH

    def _gather(self) -> _Gathered | None:
        """The gathered tensors of this step (``None`` when no parameter has a
        gradient): the last step's when the same parameters have gradients."""
        signature = tuple(p.grad is not None for g in self.param_groups for p in g["params"])
        if not any(signature):
            return None
        gathered = self._gathered
        if gathered is None or gathered.signature != signature:
            gathered = self._gathered = self._gather_new(signature)
        if gathered.params[0].device != self._device:  # the model moved after construction
            self._use_device(gathered.params[0].device)
            gathered = self._gathered = self._gather_new(signature)
        return gathered

    def _gather_new(self, signature: tuple[bool, ...]) -> _Gathered:
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
        for p, g in order:
            st = self.state[p]
            if not st:
                if p.dtype == torch.float16:
                    raise MolfError(
                        FLOAT16_MESSAGE.format(f"a parameter of shape {tuple(p.shape)}")
                    )
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:  # loaded or replaced since: the kernels write through it
                check_param_state(self.param_groups, self._names, p, g, st)
        params = [p for p, _ in order]
        state = [[self.state[p][key] for p in params] for key in ("exp_avg", "exp_avg_sq", "step")]
        return _Gathered(
            signature=signature,
            params=params,
            exp_avgs=state[0],
            exp_avg_sqs=state[1],
            steps=state[2],
            group_of=[g for _, g in order],
            num_routed=len(routed),
            layout=layout(
                self._cells,
                params[: len(routed)],
                len(self._modules),
                len(self._experts),
                self._device,
            ),
            state_fits_kernel=self._kernel is not None and self._kernel.supports(*state),
        )


def _plain_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lrs, wds, found_inf, **hyper) -> None:
    """torch's fused AdamW on the parameters outside MoLF layers, one call per
    (lr, weight decay); skipped, step counts included, when ``found_inf``."""
    by_hyper: dict[tuple[float, float], list[int]] = {}
    for i, lw in enumerate(zip(lrs, wds)):
        by_hyper.setdefault(lw, []).append(i)
    for (lr, wd), idx in by_hyper.items():
        functional_adamw(
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
