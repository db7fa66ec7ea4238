"""Shared fixtures: the shared data folder (the one place that reads ``MOLF_DATA_DIR``)
and tiny random model directories with an in-process tokenizer, which every
``molf train`` test that needs only *some* model runs on (helpers.py builds them).

A test that takes ``shared_data`` (or a fixture built on it, such as ``stories``) is
marked ``shared_data`` and skips when ``MOLF_DATA_DIR`` is unset: ``-m "not
shared_data"`` selects the tests that run on a bare checkout."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO_ROOT = Path(__file__).resolve().parents[1]
# fixtures that read the shared data (tests/tasks/conftest.py's shared_data is one too)
SHARED_DATA_FIXTURES = {"shared_data"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SHARED_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$MOLF_DATA_DIR``, the shared data folder (a relative path is taken from the
    repository root); the test skips when it is unset or not a directory."""
    value = os.environ.get("MOLF_DATA_DIR")
    if not value:
        pytest.skip("MOLF_DATA_DIR is unset: set it to the shared data folder (../shared/data)")
    path = Path(value)
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.is_dir():
        pytest.skip(f"MOLF_DATA_DIR={value} is not a directory")
    return path


@pytest.fixture(scope="session")
def stories(shared_data: Path) -> Path:
    """The real pretrained stories260k Llama of the shared data (for tests of a
    trained model's behaviour; a test that needs only some model takes tiny_model_dir)."""
    return shared_data / "models" / "stories260k"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_dir(arch)``: the directory of a tiny random ``arch`` model ("llama",
    "qwen2" or "gemma3") with a byte-level BPE tokenizer trained in-process, built once
    per session and shared, so read it only (copy it to change it)."""
    from helpers import save_tiny_model_dir, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = tiny_tokenizer()
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = save_tiny_model_dir(root / f"tiny-{arch}", arch, tokenizer)
        return built[arch]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_dir) -> Path:
    """A tiny random Llama (tied embeddings, no pad token, no chat template) saved with
    its in-process tokenizer: the model of the ``molf train`` end-to-end tests."""
    return tiny_dir("llama")
