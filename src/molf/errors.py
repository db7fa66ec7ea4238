"""User-facing errors.

Every problem a user can fix (bad config, bad data, bad paths) is raised as a
:class:`MolfError` whose message names the field and the fix. It subclasses
``ValueError`` so library users can catch it as such; the CLI turns it into one
line on stderr and exit code 2.
"""

from __future__ import annotations


class MolfError(ValueError):
    """A problem in the user's input, with a message that says how to fix it."""


class DataError(MolfError):
    """A malformed data row: names the file, the line (1-based) and the field."""

    def __init__(self, path: str, line: int | None, field: str, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: field '{field}': {problem}")
        self.path, self.line, self.field = path, line, field


class Interrupted(Exception):
    """Training stopped on request (SIGTERM, Ctrl-C); ``step`` is the last one done and
    ``saved`` whether a checkpoint of it was written, so ``--resume`` loses nothing."""

    def __init__(self, step: int, saved: bool) -> None:
        where = f"after step {step}" + (f" (checkpoint-{step} written)" if saved else "")
        super().__init__(f"interrupted {where}; continue with --resume")
        self.step, self.saved = step, saved
