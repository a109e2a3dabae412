"""The delivery log buffer stays bounded while the database hangs (a real lock, not a mock)."""

import asyncio
import contextlib
import types
import uuid

import psycopg
import pytest
from django.db import connection
from django.utils import timezone

from notifications.delivery_log import DeliveryLogWriter

pytestmark = pytest.mark.skipif("connection.vendor != 'postgresql'", reason="locks a PostgreSQL table")


def _lock_delivery_table() -> psycopg.Connection:
    """A second session that holds the delivery table locked: every write to it waits."""
    params = connection.settings_dict
    locker = psycopg.connect(
        host=params["HOST"] or "127.0.0.1",
        port=params["PORT"] or 5432,
        user=params["USER"],
        password=params["PASSWORD"] or None,
        dbname=params["NAME"],
    )
    locker.execute("LOCK TABLE notifications_delivery IN ACCESS EXCLUSIVE MODE")
    return locker


async def test_rows_past_the_cap_are_dropped_oldest_first_while_a_flush_hangs(transactional_db, settings):
    settings.RT_DELIVERY_LOG_MAX_BUFFERED = 1000
    settings.RT_DELIVERY_LOG_INTERVAL = 0.01
    writer = DeliveryLogWriter("bounded")
    sockets = [types.SimpleNamespace(user_id=None, connection_id=f"c-{n}") for n in range(10)]
    locker = await asyncio.to_thread(_lock_delivery_table)
    writer.start()
    try:
        last = None
        for _ in range(3000):  # 30,000 rows against a cap of 1,000
            last = uuid.uuid4()
            writer.record_deliveries(last, timezone.now(), sockets)
            await asyncio.sleep(0)  # let the flush start (and hang on the lock)
            assert writer.pending <= 1000 + len(sockets)
        # The newest rows are the ones kept.
        assert writer._deliveries[-1][0] == last
    finally:
        await asyncio.to_thread(locker.close)  # ends its transaction: the lock goes
        with contextlib.suppress(Exception):
            await writer.stop()
