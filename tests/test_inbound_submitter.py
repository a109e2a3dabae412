"""The web instance's shared batches of inbound frames, in-process, with the real database and broker."""

import asyncio

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.db import DataError, connection

from notifications.models import InboundFrame
from notifications.services.inbound import NewInbound


def frame(user_id: int, n: int, payload=None) -> NewInbound:
    return NewInbound(
        user_id=user_id,
        event="echo",
        payload={"n": n} if payload is None else payload,
        ref=f"r{n}",
        connection=f"c-{n}",
        instance="test",
    )


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite stores \\u0000; PostgreSQL refuses it")
async def test_a_row_the_database_refuses_fails_alone_in_its_batch(bridge, users):
    """Consumers refuse \\u0000 before this point; should a row still be refused, only it fails."""
    user_id = await database_sync_to_async(lambda: User.objects.get(username="bob").pk)()
    good = [frame(user_id, n) for n in range(6)]
    refused = frame(user_id, 99, payload={"text": "a\u0000b"})
    outcomes = await asyncio.gather(
        *(bridge.inbound.submit(f) for f in [*good[:3], refused, *good[3:]]), return_exceptions=True
    )
    assert [type(o).__name__ for o in outcomes] == ["NoneType"] * 3 + ["DataError"] + ["NoneType"] * 3
    assert isinstance(outcomes[3], DataError)
    stored = await database_sync_to_async(
        lambda: {row[0]: row[1:] for row in InboundFrame.objects.values_list("id", "status", "payload")}
    )()
    assert stored == {f.id: ("accepted", f.payload) for f in good}
