"""The AdamW hyperparameters every route starts from: ``MoLFAdamW``, ``MoLFAdamWFactory``,
``MoLFTrainer`` and ``molf train`` read them here, so the same run is the same run
whichever route builds it.

They are ``transformers.TrainingArguments``' own defaults (``weight_decay``,
``adam_beta1``/``adam_beta2``, ``adam_epsilon``); where a ``TrainingArguments`` exists
its values win. The update they parametrise, per parameter ``p`` with gradient ``g``::

    m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
    p = p - lr (weight_decay p + m_hat / (sqrt(v_hat) + eps))
"""

from __future__ import annotations

WEIGHT_DECAY: float = 0.0
BETAS: tuple[float, float] = (0.9, 0.999)
EPS: float = 1e-8
