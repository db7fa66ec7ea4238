"""MoLF in the Hugging Face stack: ``transformers.Trainer`` (and trainers built on it,
such as TRL's ``SFTTrainer``) and ``accelerate``.

- Saving needs nothing from here: a model wrapped by :func:`~molf.get_molf_model` has its
  own ``save_pretrained`` (:class:`~molf.model.MergedSavePretrained`), so any Trainer's
  ``save_model()`` and ``push_to_hub()`` write the merged (plain) model, and its
  checkpoints (``checkpoint-<step>``) hold both the MoLF tensors (exact resume) and the
  merged weights (a plain ``from_pretrained`` loads the trained model).
- :class:`MoLFAdamWFactory` builds :class:`~molf.MoLFAdamW` through
  ``Trainer(optimizer_cls_and_kwargs=(MoLFAdamWFactory, molf_adamw_kwargs(args)))``,
  the route Trainer allows with ``model_init`` / hyperparameter search (and with FSDP,
  which MoLFAdamW does not support under Trainer yet: it refuses at its first step);
  :func:`molf_adamw_kwargs` maps ``TrainingArguments`` to MoLFAdamW's arguments.
- :class:`MoLFTrainerMixin` (and :class:`MoLFTrainer` = the mixin on ``Trainer``) builds
  MoLFAdamW from the ``TrainingArguments`` and logs routing shares.
- :class:`MoLFRoutingCallback` puts the routing shares into Trainer's logs, and warns
  when the Trainer's optimizer is not MoLFAdamW (``args.optim`` would train every
  expert, unrouted).
- :func:`routing_of` / :func:`find_molf_optimizer` reach the optimizer through wrappers
  (accelerate's ``AcceleratedOptimizer``, a Trainer, ...).
- :func:`merged_state_dict`: the state dict of the merged model, without merging the model.

One module per job: :mod:`.discovery` (the model and optimizer through wrappers),
:mod:`.optimizer` (building MoLFAdamW), :mod:`.saving` (the merged state dict),
:mod:`.callback` (routing logs) and :mod:`.trainer` (the Trainer mixin).
"""

from molf.integrations.hf.callback import MoLFRoutingCallback
from molf.integrations.hf.discovery import find_molf_optimizer, routing_of
from molf.integrations.hf.optimizer import MoLFAdamWFactory, molf_adamw_kwargs
from molf.integrations.hf.saving import merged_state_dict
from molf.integrations.hf.trainer import MoLFTrainer, MoLFTrainerMixin

__all__ = [
    "MoLFAdamWFactory",
    "MoLFRoutingCallback",
    "MoLFTrainer",
    "MoLFTrainerMixin",
    "find_molf_optimizer",
    "merged_state_dict",
    "molf_adamw_kwargs",
    "routing_of",
]
