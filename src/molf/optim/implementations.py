"""Which routed step MoLFAdamW runs: the names it takes and the kernel for a device.

``implementation`` is one of :data:`IMPLEMENTATIONS`. :func:`fast_implementation` turns
it into the kernel for the parameters' device once (at construction, and again when
the parameters move); the optimizer still falls back to :data:`FOREACH`, step by step,
for tensors that kernel cannot take, and runs :data:`REFERENCE` when asked to.
"""

from __future__ import annotations

import torch

from molf.errors import MolfError
from molf.optim import cpu_kernel
from molf.optim.foreach import Foreach
from molf.optim.functional import RoutedStep
from molf.optim.reference import Reference

IMPLEMENTATIONS = ("auto", "foreach", "cpu_kernel", "triton", "reference")

FOREACH = Foreach()  # any device, dtype or tensor subclass
REFERENCE = Reference()  # the float64 spec


def fast_implementation(implementation: str, device: torch.device) -> RoutedStep | None:
    """The kernel ``implementation`` asks for on ``device`` (``None``: foreach or the
    reference only)."""
    if implementation in ("auto", "cpu_kernel") and device.type == "cpu":
        kernel = cpu_kernel.load()
        if kernel is None and implementation == "cpu_kernel":
            raise MolfError(
                "MoLFAdamW(implementation='cpu_kernel') needs the parameters on the CPU and "
                "a C compiler (cc/gcc on PATH, or $CC) to build molf's kernel; use 'auto' "
                "or 'foreach'"
            )
        return kernel
    if implementation == "cpu_kernel":
        raise MolfError(
            f"MoLFAdamW(implementation='cpu_kernel') needs the parameters on the CPU, not "
            f"{device}; use 'auto'"
        )
    if implementation == "triton" or (implementation == "auto" and device.type == "cuda"):
        # Checked on an H200 (benchmarks/gpu_check.py): equal to the reference, no
        # sync, 1.37x fused AdamW against foreach's 4.8x at Qwen2.5-1.5B shapes.
        try:
            from molf.optim import triton_kernel
        except ImportError as exc:
            if implementation == "triton":
                raise MolfError(
                    f"MoLFAdamW(implementation='triton') needs Triton ({exc}); use 'auto'"
                ) from exc
            return None
        return triton_kernel.load()
    return None
