"""Publishing a batch's replies: the messages handlers asked for, once their frames committed."""

import asyncio
import logging

from django.utils import timezone

from consumers_app.outages import OutageWaiter
from notifications import broker, metrics
from notifications.broker import Outlets
from notifications.models import Message
from notifications.services.messages import broker_body, mark_failed, mark_published

logger = logging.getLogger(__name__)

# Replies per broker message at most (they are published together, see `broker.pack`).
REPLIES_PER_MESSAGE = 64


async def publish_replies(outlets: Outlets, outages: OutageWaiter, ids: str, replies: list[Message]) -> None:
    """Publish a batch's replies, several per broker message, then record them published.

    A reply that cannot be encoded (a handler's bug) is recorded failed, alone.
    """
    published_at = timezone.now()
    # Grouped by the web instance the frames came through (where their senders most likely
    # are), several per broker message, routed to every recipient's key (CONTRACT §2): an
    # instance takes a group only if it holds one of its recipients.
    groups: dict[tuple[str, bool], list[tuple[Message, bytes, str]]] = {}
    sendable: list[tuple[Message, bytes]] = []
    for reply in replies:
        reply.published_at = reply.published_at or published_at
        body = broker_body(reply)
        try:
            encoded = broker.encode(body)
        except (TypeError, ValueError) as exc:
            logger.error("%s: reply %s cannot be encoded: %s", outages.queue_name, reply.id, exc)
            await outages.until_database_recovers(
                "recording a failed reply",
                ids,
                lambda r=reply, e=exc: mark_failed(r, f"unencodable: {e}"),  # type: ignore[misc]  # mypy cannot infer a lambda with default arguments
            )
            continue
        key = broker.routing_key(body)
        sendable.append((reply, encoded))
        groups.setdefault((reply.route_group, not key), []).append((reply, encoded, key))

    async def publish_chunk(chunk: list[tuple[Message, bytes, str]]) -> None:
        body = broker.pack_encoded(broker.MESSAGES, [encoded for _, encoded, _ in chunk])
        message_id = broker.message_id_for([reply.id for reply, _, _ in chunk])
        keys = list(dict.fromkeys(key for _, _, key in chunk))
        await outages.until_broker_recovers(ids, lambda: outlets.publish(body, message_id, keys))

    await asyncio.gather(
        *(
            publish_chunk(group[start : start + REPLIES_PER_MESSAGE])
            for group in groups.values()
            for start in range(0, len(group), REPLIES_PER_MESSAGE)
        )
    )
    published = [reply for reply, _ in sendable]
    metrics.messages_published.inc(len(published))
    if published:
        await outages.until_database_recovers("recording replies", ids, lambda: mark_published(published))
