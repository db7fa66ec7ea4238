"""MoLF for ``transformers.Trainer`` and trainers built on it: :class:`MoLFTrainerMixin`
builds MoLFAdamW from the ``TrainingArguments``, attaches the routing callback, saves the
merged model at the end and both the MoLF tensors and the merged weights in checkpoints;
:class:`MoLFTrainer` is the mixin on ``Trainer``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn
from transformers import Trainer, TrainingArguments

from molf.integrations.hf.callback import MoLFRoutingCallback
from molf.integrations.hf.discovery import find_molf_model
from molf.integrations.hf.optimizer import build_molf_adamw, molf_adamw_kwargs
from molf.integrations.hf.saving import merged_state_dict
from molf.model import write_molf_config

logger = logging.getLogger("molf")


class MoLFTrainerMixin:
    """MoLF for ``transformers.Trainer`` or any trainer built on it: put it first among
    the bases, e.g. ``class MoLFSFTTrainer(MoLFTrainerMixin, SFTTrainer): pass``.

    - **Optimizer**: unless ``optimizers`` or ``optimizer_cls_and_kwargs`` is given,
      :class:`~molf.MoLFAdamW` with ``lr=args.learning_rate``,
      ``weight_decay=args.weight_decay``, ``betas=(args.adam_beta1, args.adam_beta2)``,
      ``eps=args.adam_epsilon`` (:func:`~molf.integrations.hf.molf_adamw_kwargs`), and
      this constructor's ``lora_lr`` and ``lora_weight_decay`` (default: the same as the
      dense ones). ``args.optim`` is not used: set to anything but its default, it is
      warned about once. Trainer's scheduler scales every group alike.
    - **Routing logs**: a :class:`MoLFRoutingCallback` is attached (``routing_logs=False``
      to leave it out).
    - **Saving**: ``save_model()`` (and ``push_to_hub()``) writes the merged model,
      computed into a state dict (the model being trained is not changed), which
      ``AutoModelForCausalLM.from_pretrained`` loads like any plain model. Checkpoints
      (``save_steps``) hold the MoLF tensors, which ``train(resume_from_checkpoint=...)``
      restores exactly, and the merged weights under the plain names, so loading a
      checkpoint as a plain model gives the model trained so far; they also hold
      ``molf_config.json`` (wrap a fresh model with that config to resume). A model from
      ``get_molf_model`` saves itself this way under any Trainer
      (:class:`~molf.model.MergedSavePretrained`); the mixin decides final save or
      checkpoint by the call rather than the directory name, and merges a MoLF model that
      is not a ``PreTrainedModel`` too.
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
        self._molf_warned_optim = False
        super().__init__(*args, **kwargs)
        if routing_logs:
            MoLFRoutingCallback.attach(self)

    def create_optimizer(self, model: nn.Module | None = None):
        if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            self._warn_optim_unused()
            kwargs = molf_adamw_kwargs(
                self.args,
                lora_lr=self.molf_lora_lr,
                lora_weight_decay=self.molf_lora_weight_decay,
            )
            self.optimizer = build_molf_adamw(self.model if model is None else model, kwargs)
            return self.optimizer
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def _warn_optim_unused(self) -> None:
        """Warn once when ``args.optim`` names an optimizer this trainer does not build."""
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if optim == _default_optim() or self._molf_warned_optim:
            return
        self._molf_warned_optim = True
        logger.warning(
            "TrainingArguments(optim=%r) is not used: %s trains with MoLFAdamW (lr, "
            "weight_decay, adam_beta1/2 and adam_epsilon from the arguments). Leave optim "
            "unset, or train with transformers.Trainer for %r without MoLF routing",
            optim,
            type(self).__name__,
            optim,
        )

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
            write_molf_config(model.molf_config, Path(output_dir or self.args.output_dir))


def _default_optim() -> str:
    """``TrainingArguments``' default ``optim`` (it depends on the torch version)."""
    field = next(f for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    return str(getattr(field.default, "value", field.default))


class MoLFTrainer(MoLFTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`MoLFTrainerMixin`: MoLFAdamW from the
    ``TrainingArguments`` (plus ``lora_lr``, ``lora_weight_decay``), routing shares in
    the logs, merged final saves and exactly resumable checkpoints."""
