"""SQL as text: cleaning up generated SQL and comparing it with the gold query.

Nothing here raises on a bad prediction: sqlglot can fail on odd input in many ways
(parse errors, but also KeyError or RecursionError on deeply nested text), and every
such failure makes the text "unparsable" instead of ending an evaluation.

Definitions used by the metrics:

- *parses*: sqlglot (SQLite dialect) reads the text into at least one tree without
  raising; text longer than ``MAX_PARSE_CHARS``, or with more than
  ``MAX_BARE_JOINS`` JOINs that lack an ON or USING, is not tried and does not parse
  (sqlglot's parse time doubles with each such JOIN: a generation that repeats
  "JOIN t" 30 times would take hours);
- *valid*: it parses into exactly one tree, and that tree is a query, DML or DDL
  statement (not a bare expression, PRAGMA or unparsed command);
- *canonical form* (exact match compares these): sqlglot's rendering of the tree with
  every identifier lower-cased and keywords in sqlglot's fixed case, string literals
  kept as written. SQLite identifiers are case-insensitive; string values are not
  ('Texas' is not 'texas'). A double-quoted bare name that is not one of the
  database's column names is read as SQLite reads it: a string literal (Spider writes
  ``WHERE name = "Texas"``). Text that is not a valid statement falls back to its
  words joined by single spaces, lower-cased outside quotes, without a final ';'.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager

import sqlglot
from sqlglot import exp

DIALECT = "sqlite"
MAX_PARSE_CHARS = 20_000  # longer text is not handed to sqlglot (its parse time grows with it)
MAX_BARE_JOINS = 12  # nor text with more JOINs lacking ON/USING (each doubles its parse time)
MAX_PREFIX_LINES = 40  # first_statement tries at most this many leading lines
MAX_FENCE_PIECES = 16  # postprocess_sql looks at most at this many ```-separated pieces
# parse trees that are whole statements; sqlglot also parses bare words as expressions
_STATEMENTS = (exp.Query, exp.DML, exp.DDL, exp.Drop, exp.Alter)
_TAG = re.compile(r"^[ \t]*(?:sqlite|sql)?[ \t]*\n", re.I)  # a code fence's language line
_LEAD = re.compile(r"^\s*SQL\s*:", re.I)
_JOIN_WORDS = re.compile(r"\b(join|on|using)\b", re.I)
_BARE = re.compile(r"[a-z_][a-z0-9_]*")
_QUOTED = re.compile(r"'[^']*'?|\"[^\"]*\"?")  # quoted spans, an unclosed one to the end


@contextmanager
def _quiet_sqlglot() -> Iterator[None]:
    """Silence sqlglot's warnings (one per text it falls back to reading as a raw command)."""
    logger = logging.getLogger("sqlglot")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def postprocess_sql(generated: str) -> str:
    """The first SQL statement in a generation, without its semicolon.

    Handles ```sql code fences``` (also unclosed, or only a closing one), a leading
    "SQL:", and prose after the statement. Text inside fences is tried first, then
    the text around them; the first piece that yields a valid statement wins, else
    the first piece's text is returned as it is (and will score as invalid).
    """
    pieces = generated.split("```", MAX_FENCE_PIECES)[:MAX_FENCE_PIECES]
    inside = [_TAG.sub("", piece, count=1) for piece in pieces[1::2]]
    statements = [first_statement(piece) for piece in [*inside, *pieces[0::2]]]
    return next((s for s in statements if is_valid_sql(s)), statements[0])


def first_statement(text: str) -> str:
    """Text up to the first ';' outside quotes, else its most leading lines (at most
    ``MAX_PREFIX_LINES``) that form a valid statement, else the text itself."""
    text = _LEAD.sub("", text).strip()
    end = _statement_end(text)
    if end is not None:
        return text[:end].strip()
    lines = text.split("\n", MAX_PREFIX_LINES)[:MAX_PREFIX_LINES]
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


def parse_trees(sql: str) -> list[exp.Expression] | None:
    """sqlglot's trees for ``sql`` (empty statements dropped), or None when it does not
    parse: sqlglot raised (any exception), found nothing, or the text is too long."""
    if len(sql) > MAX_PARSE_CHARS or bare_joins(sql) > MAX_BARE_JOINS:
        return None
    try:
        with _quiet_sqlglot():
            trees = [tree for tree in sqlglot.parse(sql, read=DIALECT) if tree is not None]
    except Exception:  # sqlglot raises more than ParseError on odd text (KeyError, RecursionError)
        return None
    return trees or None


def bare_joins(sql: str) -> int:
    """How many JOINs (outside quotes) are followed by another JOIN or the end before
    any ON or USING."""
    words = [w.lower() for w in _JOIN_WORDS.findall(_QUOTED.sub("''", sql))]
    return sum(
        w == "join" and (i + 1 == len(words) or words[i + 1] == "join") for i, w in enumerate(words)
    )


def single_statement(sql: str) -> exp.Expression | None:
    """The one statement tree of a valid ``sql`` (see the module docstring), else None."""
    return statement(parse_trees(sql))


def statement(trees: list[exp.Expression] | None) -> exp.Expression | None:
    """The tree of ``parse_trees``' result when it is exactly one statement, else None."""
    if trees is None or len(trees) != 1 or not isinstance(trees[0], _STATEMENTS):
        return None
    return trees[0]


def is_valid_sql(sql: str) -> bool:
    """Whether sqlglot parses ``sql`` (SQLite dialect) as exactly one query, DML or DDL
    statement (bare expressions, PRAGMAs and unparsed commands do not count)."""
    return single_statement(sql) is not None


def resolve_double_quoted(tree: exp.Expression, columns: Collection[str]) -> exp.Expression:
    """A copy of ``tree`` where each double-quoted bare name that is not in ``columns``
    (lower-case column names) is a string literal, as SQLite resolves it."""
    tree = tree.copy()
    for column in list(tree.find_all(exp.Column)):
        name = column.this
        if (
            not column.table
            and isinstance(name, exp.Identifier)
            and name.quoted
            and name.name.lower() not in columns
        ):
            column.replace(exp.Literal.string(name.name))
    return tree


def canonical_sql(tree: exp.Expression, columns: Collection[str] | None = None) -> str:
    """The canonical form of a statement tree (module docstring). Without ``columns``,
    double-quoted bare names stay names but keep their case (they may be strings)."""
    if columns is not None:
        tree = resolve_double_quoted(tree, columns)
    else:
        tree = tree.copy()
    for identifier in tree.find_all(exp.Identifier):
        parent = identifier.parent
        keeps_case = (
            columns is None
            and identifier.quoted
            and isinstance(parent, exp.Column)
            and not parent.table
        )
        if not keeps_case:
            name = identifier.name.lower()
            identifier.set("this", name)
            identifier.set("quoted", not _BARE.fullmatch(name))
    return tree.sql(dialect=DIALECT)


def fold_text(sql: str) -> str:
    """Words joined by single spaces, lower-cased outside quotes, without a final ';'."""
    text = " ".join(sql.strip().rstrip(";").split())
    out, pos = [], 0
    for quoted in _QUOTED.finditer(text):
        out += [text[pos : quoted.start()].lower(), quoted.group()]
        pos = quoted.end()
    return "".join([*out, text[pos:].lower()])


def normalize_sql(sql: str, columns: Collection[str] | None = None) -> str:
    """The canonical form of ``sql`` when it is valid, else :func:`fold_text` of it.

    ``columns``: the database's column names, lower-case, when known. Never raises.
    """
    return normalize_parsed(sql, single_statement(sql), columns)


def normalize_parsed(
    sql: str, tree: exp.Expression | None, columns: Collection[str] | None = None
) -> str:
    """:func:`normalize_sql` of ``sql`` whose statement tree (``single_statement``) is given."""
    if tree is not None:
        try:
            return canonical_sql(tree, columns)
        except Exception:  # sqlglot's generator can fail on trees it parsed
            pass
    return fold_text(sql)


def sql_exact_match(predicted: str, gold: str, columns: Collection[str] | None = None) -> bool:
    """Equal after :func:`normalize_sql` (so identifier and keyword case, spacing and a
    final ';' do not count; string literal case does)."""
    return normalize_sql(predicted, columns) == normalize_sql(gold, columns)
