"""The task registry the CLI and training loop use."""

from __future__ import annotations

import pytest

from molf.errors import MolfError
from molf.tasks import TASK_NAMES, get_task


def test_every_listed_task_exists_with_its_name() -> None:
    assert TASK_NAMES == ("fact", "med", "sql", "jsonl")
    for name in TASK_NAMES:
        task = get_task(name)
        assert task.name == name and task.primary_metric


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(
        MolfError, match="unknown task 'mmlu'; choose one of: fact, med, sql, jsonl"
    ):
        get_task("mmlu")
