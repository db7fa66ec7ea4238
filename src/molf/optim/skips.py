"""The count of steps MoLFAdamW skipped for a non-finite gradient, kept without syncs.

A step never reads ``found_inf`` on the host: it adds it to a counter on the device
and starts a copy of that counter to the host (pinned memory, an asynchronous copy and
a CUDA event on a GPU). A later step warns about new skips once that copy has landed,
so a skip is reported a step or so late but the step never waits for the device. Only
:attr:`SkipCounter.total` (and so ``state_dict``) synchronises.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

logger = logging.getLogger("molf")


class SkipCounter:
    """Skipped steps on the parameters' device, with a host copy for the warnings."""

    def __init__(self, device: torch.device) -> None:
        self._count = torch.zeros((), dtype=torch.int64)
        self.to(device)
        self._event: torch.cuda.Event | None = None
        self._reported = 0

    def to(self, device: torch.device) -> None:
        """Keep the counter on ``device`` (where ``found_inf`` will be)."""
        self._device = device
        self._count = self._count.to(device)
        self._host = torch.zeros((), dtype=torch.int64, pin_memory=device.type == "cuda")

    @property
    def total(self) -> int:
        """Steps skipped so far (synchronises with the device)."""
        return int(self._count)

    def load(self, total: int) -> None:
        """Start again from a saved ``total``, as already reported."""
        self._count.fill_(total)
        self._reported = total

    def add(self, found_inf: Tensor) -> None:
        """Count this step's ``found_inf`` (0 or 1) and copy the counter to the host
        without waiting for the device."""
        self._count += found_inf.long()
        if self._device.type == "cuda":
            self._host.copy_(self._count, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = self._count
            self.poll()

    def poll(self) -> None:
        """Warn about newly skipped steps once the host copy has landed."""
        if self._event is not None and not self._event.query():
            return
        count = int(self._host)
        if count > self._reported:
            logger.warning(
                "MoLFAdamW skipped %d step(s) with a non-finite gradient (%d in all): no "
                "weight or moment changed",
                count - self._reported,
                count,
            )
            self._reported = count
