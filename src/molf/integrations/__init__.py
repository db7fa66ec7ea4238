"""molf inside other libraries' training loops.

- :mod:`molf.integrations.hf`: the Hugging Face stack (``transformers.Trainer`` and
  trainers built on it such as TRL's ``SFTTrainer``, and ``accelerate``).
"""
