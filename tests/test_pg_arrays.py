"""Array literals built by `pg_arrays` read back by PostgreSQL as the values they were made of."""

import uuid

import pytest
from django.db import connection

from notifications.services import pg_arrays

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL array literals"),
]

AWKWARD_TEXTS = [
    "plain",
    "",
    "with space",
    "comma,inside",
    'double "quote"',
    "back\\slash",
    "trailing\\",
    "{braces}",
    "NULL",
    "single 'quote'",
    "tab\tand newline\n",
    "ünïcödé ✓",
]


def read_back(literal: str, pg_type: str) -> list[object]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT %s::{pg_type}[]", [literal])
        return cursor.fetchone()[0]


def test_texts_come_back_as_they_were() -> None:
    assert read_back(pg_arrays.literal(AWKWARD_TEXTS), "text") == AWKWARD_TEXTS


def test_uuids_and_integers_come_back_as_they_were() -> None:
    ids = [uuid.uuid4() for _ in range(5)]
    assert [str(value) for value in read_back(pg_arrays.literal(ids), "uuid")] == [str(i) for i in ids]
    assert read_back(pg_arrays.literal([1, 0, 2**40]), "bigint") == [1, 0, 2**40]


def test_an_empty_list_is_an_empty_array() -> None:
    assert read_back(pg_arrays.literal([]), "text") == []
