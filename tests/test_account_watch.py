"""A deactivated user's open sockets are closed (in-process, real broker and database)."""

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User

from consumers_app.account_watch import CLOSE_ACCOUNT_INACTIVE
from tests.test_consumer import connect, request


@pytest.fixture
def quick_account_checks(settings):
    settings.RT_ACCOUNT_CHECK_SECONDS = 0.3


async def test_deactivating_a_user_closes_their_sockets_and_no_one_elses(quick_account_checks, bridge, users):
    bob, _ = await connect("bob")
    carol, _ = await connect("carol")
    await database_sync_to_async(User.objects.filter(username="bob").update)(is_active=False)

    closed = await bob.receive_output(timeout=5)  # the bridge's watcher closes it on its own
    assert closed == {
        "type": "websocket.close",
        "code": CLOSE_ACCOUNT_INACTIVE,
        "reason": "account deactivated",
    }
    assert await request(carol, {"type": "ping"}) == {"type": "pong"}
    await carol.disconnect()
