"""MoLF for ``transformers.Trainer`` and trainers built on it: :class:`MoLFTrainerMixin`
builds MoLFAdamW from the ``TrainingArguments``, attaches the routing callback, saves the
merged model at the end and both the MoLF tensors and the merged weights in checkpoints;
:class:`MoLFTrainer` is the mixin on ``Trainer``."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn
from transformers import Trainer

from molf.integrations.hf.callback import MoLFRoutingCallback
from molf.integrations.hf.discovery import find_molf_model
from molf.integrations.hf.optimizer import build_molf_adamw
from molf.integrations.hf.saving import merged_state_dict
from molf.model import molf_modules


class MoLFTrainerMixin:
    """MoLF for ``transformers.Trainer`` or any trainer built on it: put it first among
    the bases, e.g. ``class MoLFSFTTrainer(MoLFTrainerMixin, SFTTrainer): pass``.

    - **Optimizer**: unless ``optimizers`` or ``optimizer_cls_and_kwargs`` is given,
      :class:`~molf.MoLFAdamW` with ``lr=args.learning_rate``,
      ``weight_decay=args.weight_decay``, ``betas=(args.adam_beta1, args.adam_beta2)``,
      ``eps=args.adam_epsilon``, and this constructor's ``lora_lr`` and
      ``lora_weight_decay`` (default: the same as the dense ones). ``args.optim`` is
      not used. Trainer's scheduler scales every group alike.
    - **Routing logs**: a :class:`MoLFRoutingCallback` is attached (``routing_logs=False``
      to leave it out).
    - **Saving**: ``save_model()`` (and ``push_to_hub()``) writes the merged model,
      computed into a state dict (the model being trained is not changed), which
      ``AutoModelForCausalLM.from_pretrained`` loads like any plain model. Checkpoints
      (``save_steps``) hold the MoLF tensors, which ``train(resume_from_checkpoint=...)``
      restores exactly, and the merged weights under the plain names, so loading a
      checkpoint as a plain model gives the model trained so far; they also hold
      ``molf_config.json`` (wrap a fresh model with that config to resume).
    """

    def __init__(
        self,
        *args: Any,
        lora_lr: float | None = None,
        lora_weight_decay: float | None = None,
        routing_logs: bool = True,
        **kwargs: Any,
    ) -> None:
        self.molf_lora_lr = lora_lr
        self.molf_lora_weight_decay = lora_weight_decay
        self._molf_final_save = False
        self._molf_pushing = False
        super().__init__(*args, **kwargs)
        if routing_logs:
            MoLFRoutingCallback.attach(self)

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            a = self.args
            kwargs: dict[str, Any] = {
                "lr": a.learning_rate,
                "weight_decay": a.weight_decay,
                "betas": (a.adam_beta1, a.adam_beta2),
                "eps": a.adam_epsilon,
            }
            if self.molf_lora_lr is not None:
                kwargs["lora_lr"] = self.molf_lora_lr
            if self.molf_lora_weight_decay is not None:
                kwargs["lora_weight_decay"] = self.molf_lora_weight_decay
            self.optimizer = build_molf_adamw(self.model if model is None else model, kwargs)
            return self.optimizer
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Trainer's checkpoints call save_model(..., _internal_call=True); a final save
        # does not, and neither does push_to_hub's in spirit (it uploads the final model).
        self._molf_final_save = not _internal_call or self._molf_pushing
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            self._molf_final_save = False

    def push_to_hub(self, *args: Any, **kwargs: Any) -> Any:
        self._molf_pushing = True
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            self._molf_pushing = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = find_molf_model(self.accelerator.unwrap_model(self.model))
        if model is None or not self.args.should_save:
            return super()._save(output_dir, state_dict=state_dict)
        if state_dict is None:
            state_dict = model.state_dict()
        state_dict = merged_state_dict(model, state_dict, keep_experts=not self._molf_final_save)
        super()._save(output_dir, state_dict=state_dict)
        if not self._molf_final_save:
            path = os.path.join(output_dir or self.args.output_dir, "molf_config.json")
            with open(path, "w") as f:
                json.dump(model.molf_config.to_dict(), f, indent=2)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A checkpoint's merged weights (plain names) are unexpected keys for the MoLF
        # model by design: do not warn about them.
        model = find_molf_model(self.accelerator.unwrap_model(self.model))
        if model is not None:
            plain = {
                f"{n}.{s}" if n else s for n, _ in molf_modules(model) for s in ("weight", "bias")
            }
            load_result.unexpected_keys[:] = [
                k for k in load_result.unexpected_keys if k not in plain
            ]
        super()._issue_warnings_after_load(load_result)


class MoLFTrainer(MoLFTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`MoLFTrainerMixin`: MoLFAdamW from the
    ``TrainingArguments`` (plus ``lora_lr``, ``lora_weight_decay``), routing shares in
    the logs, merged final saves and exactly resumable checkpoints."""
