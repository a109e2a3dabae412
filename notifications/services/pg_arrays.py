"""PostgreSQL arrays as one text parameter, for the statements that take a batch's ids or names.

psycopg quotes a list parameter element by element in Python (its client-side cursor, which
Django uses); a batch of a thousand ids then cost more to send than the statement cost to run.
The array's literal is built here in one join and travels as one string (`%s::uuid[]`).
"""

from collections.abc import Iterable


def literal(values: Iterable[object]) -> str:
    """`{"a","b"}`: the values (text, UUIDs, integers) as a PostgreSQL array literal."""
    return "{" + ",".join(_quoted(str(value)) for value in values) + "}"


def _quoted(text: str) -> str:
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
