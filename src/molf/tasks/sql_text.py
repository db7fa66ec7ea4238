"""SQL as text: cleaning up generated SQL and comparing it with the gold query."""

from __future__ import annotations

import re

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

DIALECT = "sqlite"
# parse trees that are whole statements; sqlglot also parses bare words as expressions
_STATEMENTS = (exp.Query, exp.DML, exp.DDL, exp.Drop, exp.Alter)
_TAG = re.compile(r"^[ \t]*(?:sqlite|sql)?[ \t]*\n", re.I)  # a code fence's language line
_LEAD = re.compile(r"^\s*SQL\s*:", re.I)


def postprocess_sql(generated: str) -> str:
    """The first SQL statement in a generation, without its semicolon.

    Handles ```sql code fences``` (also unclosed, or only a closing one), a leading
    "SQL:", and prose after the statement. Text inside fences is tried first, then
    the text around them; the first piece that yields a valid statement wins, else
    the first piece's text is returned as it is (and will score as invalid).
    """
    pieces = generated.split("```")
    inside = [_TAG.sub("", piece, count=1) for piece in pieces[1::2]]
    statements = [first_statement(piece) for piece in [*inside, *pieces[0::2]]]
    return next((s for s in statements if is_valid_sql(s)), statements[0])


def first_statement(text: str) -> str:
    """Text up to the first ';' outside quotes, else its most leading lines that parse."""
    text = _LEAD.sub("", text).strip()
    end = _statement_end(text)
    if end is not None:
        return text[:end].strip()
    lines = text.split("\n")
    for n in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:n]).strip()
        if is_valid_sql(candidate):
            return candidate
    return text


def _statement_end(text: str) -> int | None:
    """Index of the first ';' outside quotes and brackets, if any."""
    closing = None
    for i, char in enumerate(text):
        if closing is not None:
            if char == closing:
                closing = None
        elif char in "'\"`":
            closing = char
        elif char == "[":
            closing = "]"
        elif char == ";":
            return i
    return None


def _parse_one(sql: str) -> exp.Expression | None:
    """The single statement ``sql`` holds, or None if it holds none, several, or bad SQL."""
    try:
        trees = [tree for tree in sqlglot.parse(sql, read=DIALECT) if tree is not None]
    except SqlglotError:
        return None
    return trees[0] if len(trees) == 1 else None


def is_valid_sql(sql: str) -> bool:
    """Whether sqlglot parses ``sql`` (SQLite dialect) as exactly one query, DML or DDL
    statement (bare expressions, PRAGMAs and unparsed commands do not count)."""
    return isinstance(_parse_one(sql), _STATEMENTS)


def normalize_sql(sql: str) -> str:
    """A canonical lower-case form: sqlglot's rendering, else whitespace and case folded."""
    tree = _parse_one(sql)
    if isinstance(tree, _STATEMENTS):
        return tree.sql(dialect=DIALECT, normalize=True).lower()
    return " ".join(sql.strip().rstrip(";").split()).lower()


def sql_exact_match(predicted: str, gold: str) -> bool:
    """Equal after :func:`normalize_sql` (so case, spacing and a final ';' do not count)."""
    return normalize_sql(predicted) == normalize_sql(gold)
