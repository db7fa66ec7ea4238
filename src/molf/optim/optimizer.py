"""MoLFAdamW: parameter groups, state, and one routed step per call (see :mod:`molf.optim`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as functional_adamw
from torch.profiler import record_function

from molf.errors import MolfError
from molf.model import molf_modules
from molf.optim import cpu_kernel
from molf.optim.foreach import Foreach
from molf.optim.functional import AllReduce, Layout, RoutedStep, Routing
from molf.optim.reference import Reference

logger = logging.getLogger("molf")

IMPLEMENTATIONS = ("auto", "foreach", "cpu_kernel", "triton", "reference")

_F16 = torch.float16
_F16_MESSAGE = (
    "MoLFAdamW: float16 parameters are not supported: use bf16 or fp32 (or amp: fp32 "
    "weights under torch.autocast(dtype=torch.float16)); float16 Adam moments underflow "
    "({} is float16)"
)
_FOREACH = Foreach()


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: Tensor) -> Tensor:
    """The local shard of an FSDP2 DTensor (a view), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


_LOAD = "MoLFAdamW.load_state_dict"
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")  # what MoLFAdamW keeps per parameter
_NOT_OURS = "the state is not a MoLFAdamW state: load one that MoLFAdamW.state_dict() saved"


def _shape(t: Tensor) -> tuple[int, ...]:
    """The shape the step works on: an FSDP2 DTensor's local shard's."""
    return tuple(_local(t).shape)


def _state_problem(param: Tensor, state: object, same_dtype: bool) -> str | None:
    """What is wrong with one parameter's state, or ``None``: it must be a dict holding
    ``step`` (a 0-d tensor) and ``exp_avg`` / ``exp_avg_sq`` (tensors of the
    parameter's shape, its local shard's under FSDP2, and of a floating dtype), or be
    empty (not stepped yet: the step creates it). With ``same_dtype`` (as the step
    needs them) the moments must also have the parameter's dtype; on loading, torch
    casts floating state to it."""
    if not isinstance(state, dict):
        return f"the state is of type {type(state).__name__}, not a dict; {_NOT_OURS}"
    if not state:
        return None
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        kept = ", ".join(_STATE_KEYS)
        return f"the state has no {', '.join(missing)} (MoLFAdamW keeps {kept}); {_NOT_OURS}"
    for key in _STATE_KEYS:
        if not isinstance(state[key], Tensor):
            return f"{key} is of type {type(state[key]).__name__}, not a tensor; {_NOT_OURS}"
    step_shape = tuple(state["step"].shape)
    if step_shape:
        return f"step has shape {step_shape}, expected a scalar (shape ()); {_NOT_OURS}"
    for key in ("exp_avg", "exp_avg_sq"):
        value = state[key]
        if _shape(value) != _shape(param):
            return (
                f"{key} has shape {_shape(value)}, the parameter {_shape(param)}; the state is "
                "from another model or another LoRA rank"
            )
        if not value.is_floating_point():
            return f"{key} has dtype {value.dtype}, the parameter {param.dtype}; {_NOT_OURS}"
        if same_dtype and value.dtype != param.dtype:
            return (
                f"{key} has dtype {value.dtype}, the parameter {param.dtype}; the parameter's "
                "dtype changed after its state was made: load the state again "
                "(optimizer.load_state_dict(optimizer.state_dict())) to cast it"
            )
    return None


def _check_hyperparameters(implementation: str, betas, eps, values: dict[str, float]) -> None:
    for name, value in {**values, "eps": eps}.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise MolfError(f"MoLFAdamW: {name} must be a non-negative number, got {value!r}")
    _check_betas_eps(betas, eps)
    if implementation not in IMPLEMENTATIONS:
        raise MolfError(
            f"MoLFAdamW: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )


def _check_betas_eps(betas, eps) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise MolfError(f"MoLFAdamW: betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise MolfError(f"MoLFAdamW: eps must be a non-negative number, got {eps!r}")


def _fast_implementation(implementation: str, device: torch.device) -> RoutedStep | None:
    """The kernel ``implementation`` asks for on ``device`` (``None``: foreach or the
    reference only)."""
    if implementation in ("auto", "cpu_kernel") and device.type == "cpu":
        kernel = cpu_kernel.load()
        if kernel is None and implementation == "cpu_kernel":
            raise MolfError(
                "MoLFAdamW(implementation='cpu_kernel') needs the parameters on the CPU and "
                "a C compiler (cc/gcc on PATH, or $CC) to build molf's kernel; use 'auto' "
                "or 'foreach'"
            )
        return kernel
    if implementation == "cpu_kernel":
        raise MolfError(
            f"MoLFAdamW(implementation='cpu_kernel') needs the parameters on the CPU, not "
            f"{device}; use 'auto'"
        )
    if implementation == "triton" or (implementation == "auto" and device.type == "cuda"):
        # Checked on an H200 (benchmarks/gpu_check.py): equal to the reference, no
        # sync, 1.37x fused AdamW against foreach's 4.8x at Qwen2.5-1.5B shapes.
        try:
            from molf.optim import triton_kernel
        except ImportError as exc:
            if implementation == "triton":
                raise MolfError(
                    f"MoLFAdamW(implementation='triton') needs Triton ({exc}); use 'auto'"
                ) from exc
            return None
        return triton_kernel.load()
    return None


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
        _check_hyperparameters(
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
        half = next(
            (n for n, p in model.named_parameters() if p.requires_grad and p.dtype == _F16), None
        )
        if half is not None:
            raise MolfError(_F16_MESSAGE.format(half))
        self.top_k, self.score = config.top_k, config.score
        self._names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        self._modules = [name for name, _ in layers]
        self._experts = config.expert_names
        groups, self._cells = self._param_groups(
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
        self._skipped = torch.zeros((), dtype=torch.int64)
        self._use_device(devices.pop())
        self._skip_event: torch.cuda.Event | None = None
        self._skips_reported = 0
        self.all_reduce_hook: AllReduce | None = None
        self.last_routing: Routing | None = None
        self.last_implementation: str | None = None  # which implementation the last step used
        self.register_load_state_dict_post_hook(MoLFAdamW._steps_to_device)

    def _param_groups(
        self, model: nn.Module, layers, lr, lora_lr, weight_decay, lora_weight_decay
    ) -> tuple[list[dict], dict[int, int]]:
        """The parameter groups (see the class docstring) and, for every expert tensor,
        its cell ``m * E + e`` in the [modules x experts] table (by ``id``)."""
        config = model.molf_config
        num_lora, fft, num_e = len(config.lora_ranks), int(config.train_base), len(self._experts)
        cells: dict[int, int] = {}
        buckets: dict[str, list[Tensor]] = {
            k: [] for k in ["fft", "fft_bias", *[f"lora{i}" for i in range(num_lora)]]
        }
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
        groups = []
        for key, params in buckets.items():
            if params:
                group_lr, group_wd = hyper.get(key, (lora_lr, lora_weight_decay))
                groups.append(
                    {"params": params, "name": key, "lr": group_lr, "weight_decay": group_wd}
                )
        return groups, cells

    def _use_device(self, device: torch.device) -> None:
        """Put the optimizer's own tensors (skip counter, layout) on ``device`` and pick
        the implementation for it. Runs at construction and again when the parameters
        have moved (e.g. built on the CPU, then the Trainer moves the model to CUDA), as
        torch's optimizers create their state on the parameters' device."""
        self._device = device
        self._gathered: _Gathered | None = None
        self._kernel = _fast_implementation(self.implementation, device)
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
        """As torch's, after :meth:`_check_state_dict`: a state that does not fit this
        optimizer raises :class:`MolfError` and leaves the optimizer as it was."""
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._gathered = None  # new state tensors: gather them again
        self._skipped.fill_(skipped)
        self._skips_reported = skipped

    def _check_state_dict(self, state_dict: dict) -> None:
        """Refuse (:class:`MolfError`, naming the first problem) a state dict that does
        not fit: another number of parameter groups, a group of another name or with
        another number of parameters, state for a parameter no group lists, or a
        parameter's state that :func:`_state_problem` finds wrong (torch checks only
        the counts; a wrong-shaped moment would make the step crash or write out of
        bounds)."""
        saved, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved, list) or not isinstance(state, dict):
            raise MolfError(
                f"{_LOAD}: not an optimizer state dict (it needs 'state' and "
                "'param_groups'); pass what MoLFAdamW.state_dict() returned"
            )
        self._check_groups(saved)
        index = {
            pid: (g, i)
            for g, group in enumerate(saved)
            for i, pid in enumerate(group.get("params", ()))
        }
        for pid, param_state in state.items():
            if pid not in index:
                raise MolfError(
                    f"{_LOAD}: the state has an entry for parameter {pid!r}, which no "
                    f"parameter group lists; {_NOT_OURS}"
                )
            g, i = index[pid]
            problem = _state_problem(self.param_groups[g]["params"][i], param_state, False)
            if problem is not None:
                raise MolfError(f"{_LOAD}: {self._where(g, i)}: {problem}")

    def _check_groups(self, saved: list[dict]) -> None:
        """The saved parameter groups match this optimizer's: as many, each with the
        same name (where both have one) and as many parameters."""
        mine = [(g.get("name"), len(g["params"])) for g in self.param_groups]
        theirs = [(g.get("name"), len(g.get("params", ()))) for g in saved]
        fix = (
            "the state is from another model or MoLF config (lora_ranks, train_base, "
            "train_non_linear)"
        )
        if len(theirs) != len(mine):
            raise MolfError(
                f"{_LOAD}: the state has {len(theirs)} parameter groups "
                f"({', '.join(str(n) for n, _ in theirs)}), this optimizer {len(mine)} "
                f"({', '.join(str(n) for n, _ in mine)}); {fix}"
            )
        for g, ((name, count), (saved_name, saved_count)) in enumerate(zip(mine, theirs)):
            if None not in (name, saved_name) and name != saved_name:
                raise MolfError(
                    f"{_LOAD}: group {g} is {saved_name!r} in the state, {name!r} here; {fix}"
                )
            if saved_count != count:
                raise MolfError(
                    f"{_LOAD}: group {g} ({name}) has {saved_count} parameters in the "
                    f"state, {count} here; {fix}"
                )

    def _where(self, group: int, index: int) -> str:
        """``group 2 (lora0), parameter 3 (model.layers.0.mlp.up_proj.lora_A.0)``, for
        messages (the name where the optimizer knows it)."""
        g = self.param_groups[group]
        name = self._names.get(id(g["params"][index]))
        return f"group {group} ({g.get('name', '?')}), parameter {index}" + (
            f" ({name})" if name else ""
        )

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
        self._poll_skips()
        gathered = self._gather()
        if gathered is None:
            return loss
        params, exp_avgs, exp_avg_sqs = gathered.params, gathered.exp_avgs, gathered.exp_avg_sqs
        grads = [p.grad for p in params]
        impl = self._pick(gathered, grads)
        self.last_implementation = impl.name
        if _is_dtensor(params[0]):  # FSDP2: work on this rank's shards
            params, grads, exp_avgs, exp_avg_sqs = (
                [_local(t) for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)
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
        self._skipped += found_inf.long()
        self._publish_skips()
        self.last_routing = Routing(self._modules, self._experts, scores, selected)
        return loss

    def _nonfinite(self, impl: RoutedStep, grads: list[Tensor], grad_norm: Tensor | None) -> Tensor:
        """``found_inf``: 1.0 when this step must be skipped, the same on every rank."""
        if grad_norm is not None:
            return (~torch.isfinite(_local(grad_norm).float())).float().reshape(())
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
            return _REFERENCE
        kernel = self._kernel
        if (
            kernel is not None
            and gathered.state_fits_kernel
            and not (kernel.fuses_routing and self.all_reduce_hook is not None)
            and kernel.supports(gathered.params, grads)
        ):
            return kernel
        return _FOREACH

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
                if p.dtype == _F16:
                    raise MolfError(_F16_MESSAGE.format(f"a parameter of shape {tuple(p.shape)}"))
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:  # loaded or replaced since: the kernels write through it
                self._check_state(p, g, st)
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
            layout=self._layout(params[: len(routed)]),
            state_fits_kernel=self._kernel is not None and self._kernel.supports(*state),
        )

    def _check_state(self, param: Tensor, group: int, state: dict) -> None:
        """Refuse (:class:`MolfError`) a parameter's existing state that the step cannot
        use (:func:`_state_problem`, dtype included): checked when the step gathers its
        tensors anew, i.e. after loading, not every step."""
        problem = _state_problem(param, state, True)
        if problem is not None:
            index = next(i for i, q in enumerate(self.param_groups[group]["params"]) if q is param)
            raise MolfError(f"MoLFAdamW.step: {self._where(group, index)}: {problem}")

    def _layout(self, routed: list[Tensor]) -> Layout:
        """Where each routed tensor (module by module) sits in the [modules x experts]
        table."""
        num_cells = len(self._modules) * len(self._experts)
        idx = [self._cells[id(p)] for p in routed]
        sizes = torch.zeros(num_cells, dtype=torch.float32)
        for i, p in zip(idx, routed):
            sizes[i] += p.numel()
        firsts = torch.arange(len(self._modules) + 1) * len(self._experts)
        return Layout(
            cell_index=torch.tensor(idx, dtype=torch.int64, device=self._device),
            module_starts=torch.searchsorted(torch.tensor(idx, dtype=torch.int64), firsts),
            cell_sizes=sizes.clamp_min(1.0).to(self._device),
            participating=(sizes > 0).view(len(self._modules), -1).to(self._device),
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


_REFERENCE = Reference()


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
