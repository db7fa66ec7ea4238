"""Reading molf's JSONL logs (``train_log.jsonl``, ``routing.jsonl``) back, finished or
still being written: every problem is a :class:`MolfError` naming ``path:line``; only a
torn *last* line, what a killed writer leaves, is skipped with a warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from molf.errors import MolfError

log = logging.getLogger("molf")


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-empty line of a JSONL file (1-based).

    A last line that does not parse is skipped with a warning (a killed run's torn
    write); any other line that is not a JSON object raises a MolfError ``path:line``.
    """
    lines = path.read_text().splitlines()
    last = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
    out = []
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if i == last:
                log.warning("%s:%d: skipped a torn last line (%s)", path, i + 1, e.msg)
                continue
            raise MolfError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise MolfError(f"{path}:{i + 1}: expected a JSON object, got {type(obj).__name__}")
        out.append((i + 1, obj))
    return out


def by_step(
    path: Path, records: list[tuple[int, dict[str, Any]]]
) -> dict[int, tuple[int, dict[str, Any]]]:
    """``step -> (line, record)`` in step order; a repeated step keeps its last record
    (a resumed run logs the steps after its checkpoint again)."""
    out: dict[int, tuple[int, dict[str, Any]]] = {}
    for line, rec in records:
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise MolfError(f"{path}:{line}: 'step' must be an integer, got {step!r}")
        out[step] = (line, rec)
    return dict(sorted(out.items()))
