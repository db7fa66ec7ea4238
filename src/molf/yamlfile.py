"""Reading a YAML settings file safely: one :class:`~molf.errors.MolfError` line, never a
traceback or a memory blow-up.

:func:`load_yaml` reads ``molf train --config`` files (and any other settings file) and
refuses, naming the file and, where there is one, the line: a file over
:data:`MAX_BYTES`, bytes that are not UTF-8, invalid YAML, nesting deeper than
:data:`MAX_DEPTH` levels, an alias inside its own anchor, and aliases that would expand
to more than :data:`MAX_NODES` values. The last is the "billion laughs" bomb: nine lines
of anchors, each repeating the one before nine times, are a few hundred bytes that grow
into 9**9 values once something walks them. Anchors and aliases within that budget
(``<<: *defaults``) work as usual. Everything is checked on the composed node graph,
before a single Python object is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from molf.errors import MolfError

MAX_BYTES = 1_000_000  # no settings file comes near this
MAX_DEPTH = 20  # nesting levels (a sweep file needs about five)
MAX_NODES = 100_000  # values once every alias is expanded


class _Refused(yaml.MarkedYAMLError):
    """A limit of :func:`load_yaml` was hit at ``problem_mark``."""


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses nesting deeper than :data:`MAX_DEPTH` while it
    composes (before the recursion that a deep file would otherwise exhaust)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):  # an alias adds no nesting of its own
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    problem=f"nested more than {MAX_DEPTH} levels deep; "
                    "no setting needs that: flatten it",
                    problem_mark=self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as e:  # YAML parses it; Python cannot hold it
            value = str(node.value)
            shown = value if len(value) <= 40 else value[:37] + "..."
            raise _Refused(
                problem=f"cannot read {shown!r} ({str(e).split(';')[0]}); correct the value",
                problem_mark=node.start_mark,
            ) from None


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: Node) -> None:
    """Refuse (:class:`_Refused` at the offending node) a graph whose aliases expand to
    more than :data:`MAX_NODES` values, or that contains itself."""
    sizes: dict[int, int] = {}
    inside: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in inside:
            raise _Refused(
                problem="an alias refers to the anchor it is inside; write the value out",
                problem_mark=node.start_mark,
            )
        inside.add(key)
        total = 1 + sum(size(child) for child in _children(node))
        inside.discard(key)
        if total > MAX_NODES:
            raise _Refused(
                problem=f"its aliases expand to more than {MAX_NODES} values (an alias "
                "bomb?); write the values out instead of repeating anchors",
                problem_mark=node.start_mark,
            )
        sizes[key] = total
        return total

    size(root)


def _read_text(path: Path, what: str) -> str:
    """The file's text: at most :data:`MAX_BYTES`, strict UTF-8 (MolfError otherwise)."""
    if not path.exists():
        raise MolfError(f"{what}: {path} does not exist")
    if not path.is_file():
        raise MolfError(f"{what}: {path} is not a file; give a YAML file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise MolfError(f"{what}: cannot read {path} ({e.strerror})") from None
    if len(data) > MAX_BYTES:
        raise MolfError(
            f"{what}: {path} is over {MAX_BYTES // 1_000_000} MB, far more than a settings "
            "file holds; check that it is the right file"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MolfError(
            f"{what}: {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
            "save the file as UTF-8"
        ) from None


def _line_of(error: yaml.YAMLError, text: str) -> int | None:
    """The 1-based line a YAML error points at, if it says."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is not None:
        return mark.line + 1
    position = getattr(error, "position", None)  # ReaderError: a character offset
    return text[:position].count("\n") + 1 if isinstance(position, int) else None


def _problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or getattr(error, "reason", None)
    if isinstance(error, yaml.reader.ReaderError):
        problem = f"character #x{error.character:04x} is not allowed: {error.reason}"
    return str(problem or str(error).splitlines()[0])


def load_yaml(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (empty file: ``{}``), or a MolfError of one
    line ``<what>: <path>[:<line>]: <problem>; <fix>`` (``what`` names the setting or
    command that gave the file, e.g. ``--config``). See the module docstring for the
    limits."""
    path = Path(path)
    text = _read_text(path, what)
    loader = None
    try:
        loader = _LimitedLoader(text)
        node = loader.get_single_node()
        if node is None:
            return {}
        _check_expansion(node)
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        line = _line_of(e, text)
        where = f"{path}:{line}" if line is not None else str(path)
        if isinstance(e, _Refused):
            raise MolfError(f"{what}: {where}: {e.problem}") from None
        raise MolfError(f"{what}: {where}: not valid YAML ({_problem(e)})") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MolfError(
            f"{what}: {path} must hold a mapping of settings (key: value lines), "
            f"not a {type(data).__name__}"
        )
    return data
