"""molf: fine-tune Hugging Face causal LMs with MoLF (Mixture of LoRA and Full fine-tuning)."""

from molf.adapter_export import export_peft_adapter
from molf.config import MoLFConfig
from molf.errors import DataError, MolfError
from molf.layer import MoLFLinear
from molf.model import get_molf_model, merge_and_unload, molf_modules
from molf.optim import MoLFAdamW, Routing

__all__ = [
    "DataError",
    "MoLFAdamW",
    "MoLFConfig",
    "MoLFLinear",
    "MolfError",
    "Routing",
    "export_peft_adapter",
    "get_molf_model",
    "merge_and_unload",
    "molf_modules",
]
__version__ = "0.1.0"
