"""The training methods by name: what settings need to know before any method loads.

:mod:`molf.train.args` checks ``--method`` against :data:`METHOD_NAMES` and resolves the
``--train-non-linear`` default here, so it does not import :mod:`molf.train.methods`
(which imports args); that module's registry holds one strategy per name below.
"""

from __future__ import annotations

METHOD_NAMES: tuple[str, ...] = ("fft", "lora", "dora", "adalora", "molf", "molf-e")

# The methods that train embeddings, norms and lm_head when --train-non-linear is unset.
TRAIN_NON_LINEAR_BY_DEFAULT: frozenset[str] = frozenset({"molf"})


def default_train_non_linear(method: str | None) -> bool:
    """Whether ``method`` trains the non-linear parameters when the setting is unset."""
    return method in TRAIN_NON_LINEAR_BY_DEFAULT
