"""With no broker to talk to: 503s and `unavailable`, quickly, and records that say so."""

import json

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient

from notifications.models import Message
from tests.support.processes import free_port


@pytest.fixture
async def dead_broker_bridge(transactional_db, namespace, settings, publisher):
    """A bridge pointed at a port where no broker listens: it keeps retrying, never ready."""
    from consumers_app.bridge import ensure_bridge, reset_bridge

    settings.AMQP_URL = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    await reset_bridge()
    bridge = ensure_bridge()
    publisher(bridge)
    yield bridge
    await reset_bridge()


async def test_publish_is_503_not_a_hang_and_the_record_says_failed(dead_broker_bridge, users):
    client = AsyncClient()

    async def post():
        return await client.post(
            "/api/v1/messages/",
            data=json.dumps({"topic": "t", "payload": 1}),
            content_type="application/json",
            headers=users["alice"].headers | {"Idempotency-Key": "retry-me"},
        )

    response = await post()
    assert response.status_code == 503
    assert "detail" in response.json()
    message = await database_sync_to_async(Message.objects.get)()
    assert message.status == Message.Status.FAILED and "broker" in message.error
    # The key was not remembered: the same request may be retried with it.
    again = await post()
    assert again.status_code == 503


async def test_readyz_is_503_until_connected(dead_broker_bridge, users):
    client = AsyncClient()
    assert (await client.get("/readyz")).status_code == 503
    assert (await client.get("/healthz")).status_code == 200
