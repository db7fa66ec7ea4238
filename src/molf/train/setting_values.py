"""A setting's value from YAML or a flag, as its :class:`~molf.train.args.TrainArgs`
field's type (``list`` metadata: a comma-separated list of that type), and the checks of
the settings for one's own data (``--chat-template``, a task's own settings)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from molf.errors import MolfError
from molf.tasks import TASK_NAMES, get_task

CHAT_TEMPLATES = ("auto", "none")


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML or flag value into the field's type, or say which field is wrong."""
    flag = "--" + f.name.replace("_", "-")
    if value is None:
        return None
    try:
        if "list" in f.metadata:
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, (int, float)):
                items = [items]
            return tuple(f.metadata["list"](x) for x in items)
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes"):
                return True
            if text in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(str(value)) if isinstance(value, str) else int(value)
        if kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise MolfError(f"{flag}: cannot read {value!r} as {f.type}") from None


def check_own_data(args: Any) -> None:
    """The :class:`~molf.train.args.TrainArgs` settings for one's own data: a template mode
    or file, a ``--val-size`` share in (0, 1), and no setting of one task's own
    (:attr:`~molf.tasks.Task.settings`) with another task (MolfError otherwise)."""
    if args.chat_template not in CHAT_TEMPLATES and not Path(args.chat_template).is_file():
        raise MolfError(
            f"--chat-template: {args.chat_template!r} is neither one of "
            f"{', '.join(CHAT_TEMPLATES)} nor an existing file; pass auto, none or the "
            "path of a Jinja chat template"
        )
    if not 0 < args.val_size < 1:
        raise MolfError(f"--val-size must be in (0, 1), got {args.val_size}")
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    for name in TASK_NAMES:
        own = [n for n in get_task(name).settings if getattr(args, n) != defaults[n]]
        if own and args.task != name:
            flags = ", ".join("--" + n.replace("_", "-") for n in own)
            raise MolfError(
                f"{flags}: only the {name} task reads them; drop them or use --task {name}"
            )
