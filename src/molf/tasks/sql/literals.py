"""The constant values SQL queries compare columns with, gathered to seed generated rows.

Random rows rarely satisfy ``WHERE country = 'France'`` unless 'France' is among the
values drawn; test-suite evaluation (Zhong et al., 2020) therefore draws database
values from the literals of the queries asked on that database. A *column literal*
here is a constant compared with a column: ``col = v``, ``<>``, ``<``, ``<=``, ``>``,
``>=``, ``col LIKE v``, ``col IN (v, ...)``, ``col BETWEEN v AND w`` (either side of
the comparison); it is filed under the column's lower-case name, whatever table it
belongs to. For LIKE, the pattern without its ``%`` and ``_`` wildcards is filed (a
value that matches the pattern). Double-quoted names that are no column are string
literals (SQLite's rule). Every other literal, except LIMIT and OFFSET counts, is a
*loose literal* of the database.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from sqlglot import exp

from molf.tasks.sql.text import parse_trees, resolve_double_quoted

Value = str | int | float
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike)


@dataclass
class Literals:
    """Column literals by lower-case column name, and the loose literals."""

    by_column: dict[str, set[Value]] = field(default_factory=dict)
    loose: set[Value] = field(default_factory=set)

    def add_column(self, column: str, value: Value) -> None:
        self.by_column.setdefault(column.lower(), set()).add(value)


def query_literals(queries: Iterable[str], columns: Collection[str]) -> Literals:
    """The literals of ``queries`` (see the module docstring); ``columns`` are the
    database's lower-case column names. Queries sqlglot cannot parse are skipped."""
    found = Literals()
    for query in queries:
        trees = parse_trees(query)
        for tree in trees or []:
            _collect(resolve_double_quoted(tree, columns), found)
    return found


def _collect(tree: exp.Expression, found: Literals) -> None:
    filed: set[int] = set()
    for node in tree.find_all(*_COMPARISONS, exp.In, exp.Between):
        if isinstance(node, exp.In):
            column, constants = node.this, node.expressions
        elif isinstance(node, exp.Between):
            column, constants = node.this, [node.args.get("low"), node.args.get("high")]
        else:
            column, other = node.this, node.expression
            if not isinstance(column, exp.Column):
                column, other = other, column
            constants = [other]
        if not isinstance(column, exp.Column):
            continue
        for constant in constants:
            value = literal_value(constant)
            if value is None:
                continue
            if isinstance(node, (exp.Like, exp.ILike)) and isinstance(value, str):
                value = value.replace("%", "").replace("_", "")
            found.add_column(column.name, value)
            filed.add(id(constant))
    for literal in tree.find_all(exp.Literal, exp.Neg):
        if id(literal) in filed or isinstance(literal.parent, (exp.Limit, exp.Offset, exp.Neg)):
            continue
        value = literal_value(literal)
        if value is not None:
            found.loose.add(value)


def literal_value(node: exp.Expression | None) -> Value | None:
    """The Python value of a string or number literal (a negated number too), else None."""
    negative = isinstance(node, exp.Neg)
    if negative:
        node = node.this
    if not isinstance(node, exp.Literal):
        return None
    if node.is_string:
        return None if negative else node.this
    try:
        number = float(node.this)
    except ValueError:
        return None
    if number.is_integer() and "." not in node.this and "e" not in node.this.lower():
        value: Value = int(node.this)
    else:
        value = number
    return -value if negative else value
