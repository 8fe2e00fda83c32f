"""A snapshot's ``WHERE``: which rows of a table it reads (docs/design.md, "Snapshots").

The condition comes from whoever starts the snapshot, and the Dagster launchpad is one of them:
someone who may launch a job need not be someone who may run SQL as the platform's role on the
source. So the condition is not passed on as text. It is parsed (sqlglot), allowed only if it
compares columns the records show in clear with constants (``AND``, ``OR``, ``NOT``,
comparisons, ``IN``, ``BETWEEN``, ``LIKE``, ``IS NULL``, arithmetic, casts to built-in types, the
current date and time, intervals), and written out again with every name quoted. A subquery, a
function call, a second statement or an unknown column is refused with what was wrong. A column
the policy masks or excludes is refused too: which rows a condition on it selects (and the
error a cast of its value raises) would tell the launcher what the records never show.
"""

from __future__ import annotations

import sqlglot
from psycopg import sql
from sqlglot import exp

#: The expression kinds a condition may be made of. Anything else (a function, a subquery, a
#: statement, a type of the database's own) is refused: each of those can run code.
_ALLOWED: tuple[type[exp.Expression], ...] = (
    exp.And,
    exp.Or,
    exp.Not,
    exp.Paren,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Like,
    exp.ILike,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.Neg,
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.RawString,
    exp.Null,
    exp.Boolean,
    exp.Cast,
    exp.DataType,
    exp.DataTypeParam,
    exp.Interval,
    exp.CurrentDate,
    exp.CurrentTimestamp,
)


#: The types a condition may cast to: PostgreSQL's own, each named by a keyword (a type of the
#: database's own could bring an input function or a cast of whoever owns it).
_CASTS = frozenset(
    {
        exp.DataType.Type.BIGINT,
        exp.DataType.Type.BOOLEAN,
        exp.DataType.Type.CHAR,
        exp.DataType.Type.DATE,
        exp.DataType.Type.DECIMAL,
        exp.DataType.Type.DOUBLE,
        exp.DataType.Type.FLOAT,
        exp.DataType.Type.INET,
        exp.DataType.Type.INT,
        exp.DataType.Type.INTERVAL,
        exp.DataType.Type.JSON,
        exp.DataType.Type.JSONB,
        exp.DataType.Type.NCHAR,
        exp.DataType.Type.NVARCHAR,
        exp.DataType.Type.SMALLINT,
        exp.DataType.Type.TEXT,
        exp.DataType.Type.TIME,
        exp.DataType.Type.TIMESTAMP,
        exp.DataType.Type.TIMESTAMPTZ,
        exp.DataType.Type.TIMETZ,
        exp.DataType.Type.UUID,
        exp.DataType.Type.VARCHAR,
    }
)


class ConditionError(ValueError):
    """A snapshot's condition that is not allowed; the message says what and what to write."""


def row_condition(text: str, columns: dict[str, str], hidden: frozenset[str] = frozenset()) -> str:
    """``text`` as the condition a snapshot runs: parsed, checked and written out again.

    ``columns`` are the table's, with their types (``format_type``: a type of the database's
    own is named with its schema); ``hidden`` the ones the policy masks or excludes. Unquoted
    names are folded to lower case, as PostgreSQL does; every name must be a column's, not
    hidden, and a cast may not apply to a column of the database's own type."""
    try:
        statements = sqlglot.parse(text, dialect="postgres")
    except sqlglot.errors.ParseError as exc:
        where = exc.errors[0] if exc.errors else {}
        raise ConditionError(
            f"the condition {text!r} is not SQL PostgreSQL reads: "
            f"{where.get('description', 'a syntax error')} at column {where.get('col', '?')}"
        ) from exc
    if len(statements) != 1 or statements[0] is None:
        raise ConditionError(f"the condition {text!r} must be one boolean expression, without ';'")
    tree = statements[0]
    for node in tree.walk():
        node.comments = None  # never written out: nothing of the text is kept but the tree
        if isinstance(node, exp.Var) and isinstance(node.parent, exp.Interval):
            continue  # an interval's unit
        if not isinstance(node, _ALLOWED):
            raise ConditionError(
                f"the condition {text!r} uses {node.sql(dialect='postgres')!r} "
                f"({type(node).__name__}); a snapshot's condition may only compare the table's "
                "columns with constants (=, <>, <, >, IN, BETWEEN, LIKE, IS NULL, AND, OR, "
                "NOT, arithmetic, casts, now(), current_date, intervals)"
            )
        if isinstance(node, exp.DataType) and node.this not in _CASTS:
            raise ConditionError(
                f"the condition {text!r} casts to {node.sql(dialect='postgres')}, which is not "
                "one of the built-in types a condition may cast to (numbers, text, booleans, "
                "dates and times, intervals, uuid, inet, json)"
            )
        if isinstance(node, exp.Column):
            _check_column(node, text, columns, hidden)
    for cast in tree.find_all(exp.Cast):
        if isinstance(cast.this, exp.Column) and "." in columns.get(cast.this.name, ""):
            raise ConditionError(
                f"the condition {text!r} casts column {cast.this.name!r}, of the database's own "
                f"type {columns[cast.this.name]}; compare it with a constant of that type instead"
            )
    return tree.sql(dialect="postgres", identify=True)


def _check_column(
    column: exp.Column, text: str, columns: dict[str, str], hidden: frozenset[str]
) -> None:
    if column.table:
        raise ConditionError(
            f"the condition {text!r} names {column.sql(dialect='postgres')}; name the table's "
            "columns alone, without a table or schema"
        )
    identifier = column.this
    if not isinstance(identifier, exp.Identifier):
        raise ConditionError(f"the condition {text!r} has a column without a name")
    name = identifier.name if identifier.quoted else identifier.name.lower()
    if name not in columns:
        raise ConditionError(
            f"the condition {text!r} names column {name!r}, which the table does not have; "
            f"its columns: {', '.join(columns)}"
        )
    if name in hidden:
        raise ConditionError(
            f"the condition {text!r} names column {name!r}, which the policy masks or "
            "excludes: a condition may name only columns the records show in clear"
        )
    identifier.set("this", name)
    identifier.set("quoted", True)


def as_sql(condition: str) -> sql.Composable:
    """A checked condition as a statement's part (its ``%`` kept from psycopg's parameters)."""
    return sql.SQL("({})").format(sql.SQL(condition.replace("%", "%%")))
