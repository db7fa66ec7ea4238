"""Shared fixtures: the shared data directory (helpers.py holds the tiny models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import data_dir

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if d is None or not d.exists():
        pytest.skip("MOLF_DATA_DIR is not set (CI sets it to ../shared/data)")
    return d
