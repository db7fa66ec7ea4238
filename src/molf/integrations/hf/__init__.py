"""MoLF in the Hugging Face stack: ``transformers.Trainer`` (and trainers built on it,
such as TRL's ``SFTTrainer``) and ``accelerate``.

- :class:`MoLFAdamWFactory` builds :class:`~molf.MoLFAdamW` through
  ``Trainer(optimizer_cls_and_kwargs=(MoLFAdamWFactory, {"lr": ..., "lora_lr": ...}))``,
  the route Trainer allows with ``model_init`` / hyperparameter search (and with FSDP,
  which MoLFAdamW does not support under Trainer yet: it refuses at its first step).
- :class:`MoLFTrainerMixin` (and :class:`MoLFTrainer` = the mixin on ``Trainer``) builds
  MoLFAdamW from the ``TrainingArguments``, logs routing shares, and saves safely:
  ``save_model()`` writes the merged (plain) model; checkpoints hold both the MoLF
  tensors (exact resume) and the merged weights (a plain ``from_pretrained`` loads the
  trained model, never a re-initialised one).
- :class:`MoLFRoutingCallback` puts the routing shares into Trainer's logs.
- :func:`routing_of` / :func:`find_molf_optimizer` reach the optimizer through wrappers
  (accelerate's ``AcceleratedOptimizer``, a Trainer, ...).
- :func:`merged_state_dict`: the state dict of the merged model, without merging the model.

One module per job: :mod:`.discovery` (the model and optimizer through wrappers),
:mod:`.optimizer` (building MoLFAdamW), :mod:`.saving` (the merged state dict),
:mod:`.callback` (routing logs) and :mod:`.trainer` (the Trainer mixin).
"""

from molf.integrations.hf.callback import MoLFRoutingCallback
from molf.integrations.hf.discovery import find_molf_optimizer, routing_of
from molf.integrations.hf.optimizer import MoLFAdamWFactory
from molf.integrations.hf.saving import merged_state_dict
from molf.integrations.hf.trainer import MoLFTrainer, MoLFTrainerMixin

__all__ = [
    "MoLFAdamWFactory",
    "MoLFRoutingCallback",
    "MoLFTrainer",
    "MoLFTrainerMixin",
    "find_molf_optimizer",
    "merged_state_dict",
    "routing_of",
]
