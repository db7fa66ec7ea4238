"""The paper's evaluation tasks: data loading, prompt formatting and metrics.

``get_task(name)`` gives a :class:`Task`; ``task.load(data)`` reads the hub dataset
(``data=None``) or a local path into training pairs and evaluation records, and
``task.evaluate(model, tokenizer, records)`` scores a model on those records, and
``task.data_path(data)`` tells which local file or directory a ``--data`` value names
(each task parses its own syntax: Spider's ``DIR#by-question`` is DIR).
"""

from __future__ import annotations

from molf.errors import MolfError
from molf.tasks.base import Example, Task, TaskData
from molf.tasks.fact import FactTask
from molf.tasks.jsonl import JsonlTask
from molf.tasks.med import MedTask
from molf.tasks.sql.task import SqlTask

__all__ = ["TASK_NAMES", "Example", "Task", "TaskData", "get_task"]

_TASKS: dict[str, type] = {"fact": FactTask, "med": MedTask, "sql": SqlTask, "jsonl": JsonlTask}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; MolfError listing the valid names otherwise."""
    if name not in _TASKS:
        raise MolfError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return _TASKS[name]()
