"""PostgreSQL COPY for batches: one block of text per batch, written in one call.

Formatting row by row through psycopg (or the ORM's INSERT) costs more than the database's own
work for the small rows of the delivery log and the inbound frames.
"""

from collections.abc import Iterable
from typing import Any

from django.db import connection
from django.db.models import Model

from notifications import jsonutil

NULL = "\\N"


def text(value: str) -> str:
    """A value escaped for COPY's text format."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return value


def json_text(value: Any) -> str:
    """A JSON(B) column's value; None is SQL NULL, as the ORM stores it."""
    return NULL if value is None else text(jsonutil.dumps(value).decode())


def copy_lines(model: type[Model], columns: Iterable[str], lines: list[str]) -> None:
    """Append pre-formatted lines (tab-separated, escaped with `text`) to the model's table."""
    table = connection.ops.quote_name(model._meta.db_table)
    # The raw psycopg cursor's errors become Django's (DataError, IntegrityError...), as the ORM's do.
    with connection.cursor() as cursor, connection.wrap_database_errors:
        with cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            copy.write("\n".join(lines) + "\n")
