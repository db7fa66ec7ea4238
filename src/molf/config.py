"""MoLFConfig: which layers become MoLF layers, which experts they hold, how they are routed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from molf.errors import MolfError

SCORES = ("epd", "pfn")
LORA_GRAD_PATHS = ("auto", "fused", "dual")
FUSED_WEIGHTS = ("auto", "keep", "recompute")


@dataclass
class MoLFConfig:
    """Configuration of a MoLF model.

    Each target ``nn.Linear`` computes ``W x + b + sum_i s_i B_i A_i x`` with an FFT
    expert (``W``, ``b``) and one LoRA expert per entry of ``lora_ranks``; the optimizer
    (:class:`~molf.optim.MoLFAdamW`) routes each module's update to its ``top_k``
    experts by ``score``.

    Fields:

    - ``target_modules``: which ``nn.Linear`` layers become MoLF layers, by PEFT's
      rules: ``"all-linear"`` (every ``nn.Linear`` but the output layer), a list of
      name suffixes (``["q_proj", "v_proj"]``), or a regex string that must match the
      whole qualified module name.
    - ``exclude_modules``: layers left alone, by the same rules (default: ``lm_head``).
    - ``lora_ranks``: one LoRA expert per entry, ``r_i``. ``A_i`` (``r_i x d_in``)
      starts kaiming-uniform, ``B_i`` (``d_out x r_i``) at zero, so a fresh model
      computes exactly what the base model did.
    - ``lora_alphas``: one ``alpha_i`` per rank; the expert's scale is
      ``s_i = alpha_i / sqrt(r_i)`` with ``use_rslora``, else ``alpha_i / r_i``.
    - ``use_rslora``: rank-stabilised scaling (above); default True.
    - ``lora_dropout``: dropout on the LoRA branch's input (training only); 0 keeps
      the fused gradient path available.
    - ``train_base``: whether ``W`` and ``b`` form an FFT expert that is routed and
      trained (MoLF), or stay frozen (MoLF-Efficient: routing among LoRA experts only).
    - ``train_non_linear``: whether parameters outside the target layers (embeddings,
      norms, ``lm_head``) are trained too, with plain AdamW (they are never routed).
      Default (``None``): the same as ``train_base``, as ``molf train`` does: MoLF
      trains them, MoLF-Efficient freezes them (``True`` to opt in).
    - ``top_k``: experts updated per module and step (1 = pure routing; the number of
      experts = plain AdamW on all of them).
    - ``score``: ``"epd"`` (expected preconditioned descent,
      ``lr_e / N_e * sum(m^2 / (sqrt(v) + eps))``) or ``"pfn"`` (preconditioned
      Frobenius norm, ``||m / (sqrt(v) + eps)||_F / sqrt(N_e)``), from raw moments.
    - ``lora_grad_path``: how LoRA gradients are computed: ``"fused"`` forms
      ``W + sum_i s_i B_i A_i`` and derives the LoRA gradients from ``dL/dW``;
      ``"dual"`` runs the LoRA branch per token; ``"auto"`` uses fused when the base
      is trained and dropout is 0. The gradients agree; only speed differs.
    - ``fused_weight``: on the fused path, ``"keep"`` keeps ``W'`` for backward
      (built-in autograd ops, no Python per layer in backward; a weight-sized
      activation per layer, which under autocast replaces the low-precision weight copy
      FFT keeps anyway); ``"recompute"`` rebuilds it in backward (a custom autograd
      Function, no weight-sized activation); ``"auto"`` keeps it off the CPU and under
      autocast (``molf train --parallel fsdp2`` rebuilds it: kept, it would be a whole
      unsharded weight per layer; do the same under your own FSDP or ZeRO-3). Results agree;
      speed and memory differ.
    """

    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = ("lm_head",)
    lora_ranks: Sequence[int] = (128,)
    lora_alphas: Sequence[float] = (32,)
    use_rslora: bool = True
    lora_dropout: float = 0.0
    train_base: bool = True
    train_non_linear: bool | None = None
    top_k: int = 1
    score: str = "epd"
    lora_grad_path: str = "auto"
    fused_weight: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = tuple(self.exclude_modules)
        self.lora_ranks = tuple(self.lora_ranks)
        self.lora_alphas = tuple(self.lora_alphas)
        if self.train_non_linear is None:
            self.train_non_linear = self.train_base
        self._validate()

    def _validate(self) -> None:
        if len(self.lora_ranks) == 0:
            raise MolfError("lora_ranks is empty: give at least one LoRA rank, e.g. (128,)")
        if len(self.lora_alphas) != len(self.lora_ranks):
            raise MolfError(
                f"lora_alphas has {len(self.lora_alphas)} entries but lora_ranks has "
                f"{len(self.lora_ranks)}: give one alpha per LoRA expert"
            )
        for r in self.lora_ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise MolfError(f"lora_ranks must hold positive integers, got {r!r}")
        for a in self.lora_alphas:
            if not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
                raise MolfError(f"lora_alphas must hold positive numbers, got {a!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MolfError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.score not in SCORES:
            raise MolfError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.lora_grad_path not in LORA_GRAD_PATHS:
            raise MolfError(
                f"lora_grad_path must be one of {LORA_GRAD_PATHS}, got {self.lora_grad_path!r}"
            )
        if self.fused_weight not in FUSED_WEIGHTS:
            raise MolfError(
                f"fused_weight must be one of {FUSED_WEIGHTS}, got {self.fused_weight!r}"
            )
        if self.lora_grad_path == "fused" and self.lora_dropout > 0:
            raise MolfError(
                "lora_grad_path='fused' needs lora_dropout=0 (dropout applies to the LoRA "
                "input only); use lora_grad_path='dual' or 'auto'"
            )
        n = self.num_experts
        if (
            isinstance(self.top_k, bool)
            or not isinstance(self.top_k, int)
            or not 1 <= self.top_k <= n
        ):
            raise MolfError(
                f"top_k must be between 1 and the number of experts ({n}: "
                f"{', '.join(self.expert_names)}), got {self.top_k!r}"
            )
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            raise MolfError("target_modules is empty: use 'all-linear' or name the layers")

    @property
    def expert_names(self) -> list[str]:
        """``"fft"`` when the base is trained, then ``"lora0"``, ``"lora1"``, ..."""
        names = ["fft"] if self.train_base else []
        return names + [f"lora{i}" for i in range(len(self.lora_ranks))]

    @property
    def num_experts(self) -> int:
        return len(self.lora_ranks) + int(self.train_base)

    def scalings(self) -> list[float]:
        """``s_i = alpha_i / sqrt(r_i)`` with rsLoRA, else ``alpha_i / r_i``."""
        return [
            a / math.sqrt(r) if self.use_rslora else a / r
            for r, a in zip(self.lora_ranks, self.lora_alphas)
        ]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoLFConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MolfError(
                f"unknown MoLFConfig field(s) {sorted(unknown)}; valid: {sorted(known)}"
            )
        return cls(**d)
