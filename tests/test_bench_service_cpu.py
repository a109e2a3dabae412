"""The benchmarks count the services' CPU (`bench.common.service_cpu`): PostgreSQL's work shows,
also when the backend that did it has exited (a closed connection's CPU is its postmaster's)."""

import time

import psycopg
import pytest
from django.db import connection

from bench import common

# A query that keeps its backend busy for a tenth of a second or more on any machine.
BUSY_QUERY = "SELECT count(*) FROM generate_series(1, 3000000)"
# CPU seconds the query must show at least (the kernel counts in ticks of 10 ms).
AT_LEAST = 0.05
DEADLINE_SECONDS = 10.0

pytestmark = pytest.mark.django_db


def _busy_in_own_backend() -> None:
    params = connection.get_connection_params()
    with psycopg.connect(**{k: v for k, v in params.items() if k != "cursor_factory"}) as conn:
        conn.execute(BUSY_QUERY).fetchone()


def test_a_live_backends_work_is_counted():
    connection.ensure_connection()
    before = common.service_cpu()
    with connection.cursor() as cursor:
        cursor.execute(BUSY_QUERY)
        cursor.fetchone()
    assert common.service_cpu_since(before)["postgresql"] >= AT_LEAST


def test_an_exited_backends_work_is_counted():
    before = common.service_cpu()
    _busy_in_own_backend()  # connects, works, disconnects: the backend exits
    deadline = time.monotonic() + DEADLINE_SECONDS
    spent = common.service_cpu_since(before)["postgresql"]
    while spent < AT_LEAST and time.monotonic() < deadline:
        time.sleep(0.05)  # the postmaster reaps it (and adds its CPU) as soon as it is scheduled
        spent = common.service_cpu_since(before)["postgresql"]
    assert spent >= AT_LEAST
