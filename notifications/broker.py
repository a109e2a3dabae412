"""RabbitMQ topology (CONTRACT §2) and the connection every process of a deployment shares.

Web instances and workers declare the whole topology when they connect, so the dead-letter
queue exists as soon as any process has started, and a broker restart re-creates nothing by
hand: the robust connection re-declares what was declared on it.
"""

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from django.conf import settings

from notifications import amqp_nodes, jsonutil
from notifications.backoff import Backoff, Stopped

logger = logging.getLogger(__name__)

# The quorum queue's own safety net: a frame that kills its worker this many times is
# dead-lettered by the broker even though no worker could record why.
INBOUND_DELIVERY_LIMIT = 20
# Largest wait (seconds) between attempts to reach a broker that is down.
CONNECT_BACKOFF_MAX = 15.0


# Keys of `pack`ed messages.
FRAMES = "frames"
MESSAGES = "messages"


class BrokerUnavailable(Exception):
    """The broker did not confirm a message: not connected, nacked, unroutable or timed out.

    `maybe_taken` tells the cases apart where the message went out and the broker may have it
    all the same (a confirm that never came, a connection lost mid-publish) from those where
    nothing was sent.
    """

    def __init__(self, reason: str, *, maybe_taken: bool = False) -> None:
        super().__init__(reason)
        self.maybe_taken = maybe_taken


@dataclass(frozen=True)
class Topology:
    """Every name a deployment declares, all under its namespace."""

    namespace: str

    @property
    def broadcast_exchange(self) -> str:
        return f"{self.namespace}.broadcast"

    @property
    def route_exchange(self) -> str:
        """Direct exchange of topic and user messages: an instance binds the keys it holds."""
        return f"{self.namespace}.route"

    def instance_queue(self, instance_id: str) -> str:
        return f"{self.namespace}.instance.{instance_id}"

    @property
    def inbound_queue(self) -> str:
        return f"{self.namespace}.inbound"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.inbound.dead"

    def retry_queue(self, delay_seconds: int) -> str:
        return f"{self.namespace}.inbound.retry.{delay_seconds}s"

    def all_exchange_names(self) -> list[str]:
        return [self.broadcast_exchange, self.route_exchange]

    def all_queue_names(self, instance_ids: Iterable[str] = ()) -> list[str]:
        names = [self.inbound_queue, self.dead_queue]
        names += [self.retry_queue(delay) for delay in settings.RT_INBOUND_RETRY_DELAYS]
        names += [self.instance_queue(i) for i in instance_ids]
        return names


def current_topology() -> Topology:
    return Topology(settings.RT_NAMESPACE)


def encode(body: dict[str, Any]) -> bytes:
    return jsonutil.dumps(body)


def decode(body: bytes) -> dict[str, Any]:
    value = orjson.loads(body)
    if not isinstance(value, dict):
        raise ValueError("broker message is not a JSON object")
    return value


def pack(key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Many items (frames on `<ns>.inbound`, messages on `<ns>.broadcast`) as ONE broker message.

    The broker and its Python clients cost about the same per message whatever its size, so a
    busy process sends what it has together: `{key: [item, ...]}`. One item travels as itself.
    """
    return items[0] if len(items) == 1 else {key: items}


def pack_encoded(key: str, items: list[bytes]) -> bytes:
    """`pack`, for items already encoded one by one (so one that cannot be encoded fails alone)."""
    return items[0] if len(items) == 1 else b'{"%s":[%s]}' % (key.encode(), b",".join(items))


def unpack(body: dict[str, Any], key: str) -> list[Any]:
    """The items of a message made by `pack`; ValueError unless there is at least one (a message
    with none would be taken and never settled). Each item is checked by its reader, so that one
    that is not a JSON object of the right shape fails alone."""
    if key not in body:
        return [body]
    items = body[key]
    if not isinstance(items, list) or not items:
        raise ValueError(f"`{key}` is not a non-empty list")
    return items


def message_id_for(item_ids: Sequence[object]) -> str:
    """The broker message id of a `pack`ed message: its item's own id when it carries one item
    (so a redelivered copy can be recognised), a fresh id for several."""
    return str(item_ids[0]) if len(item_ids) == 1 else f"batch-{uuid.uuid4()}"


def json_message(
    body: dict[str, Any] | bytes,
    *,
    message_id: str,
    persistent: bool = True,
    headers: dict[str, Any] | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body if isinstance(body, bytes) else encode(body),
        content_type="application/json",
        message_id=message_id,
        headers=headers,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        if persistent
        else aio_pika.DeliveryMode.NOT_PERSISTENT,
    )


async def connect(
    stop: asyncio.Event | None = None, unreachable: asyncio.Event | None = None
) -> AbstractRobustConnection:
    """Connect to a node of `AMQP_URL` that answers, retrying with capped, jittered backoff until
    one does (or `stop`); `unreachable` is set once a round of every node failed.

    With several nodes (comma-separated), each round tries every node once, beginning at a random
    one so that the processes of a deployment spread over the cluster; the connection then moves
    to the next node whenever its own fails (see `amqp_nodes.FailoverConnection`), and restores
    what was declared on it there.
    """
    nodes = amqp_nodes.parse(settings.AMQP_URL)
    backoff = Backoff(CONNECT_BACKOFF_MAX)
    order = amqp_nodes.rotation(len(nodes), amqp_nodes.random_start(len(nodes)))
    while True:
        for index in order:
            try:
                connection = await amqp_nodes.connect(
                    nodes,
                    index,
                    heartbeat=settings.RT_AMQP_HEARTBEAT,
                    client_properties={"connection_name": settings.RT_INSTANCE_ID},
                    timeout=10,
                )
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                logger.warning(
                    "cannot reach RabbitMQ at %s (%s: %s)%s",
                    amqp_nodes.redact_one(nodes[index]),
                    type(exc).__name__,
                    exc,
                    "; trying the next node" if len(nodes) > 1 else "; retrying",
                )
                if stop is not None and stop.is_set():
                    raise asyncio.CancelledError("stopped while connecting") from None
                continue
            logger.info(
                "connected to RabbitMQ at %s%s",
                amqp_nodes.redact_one(nodes[index]),
                f" (node {index + 1} of {len(nodes)})" if len(nodes) > 1 else "",
            )
            return connection
        if unreachable is not None:
            unreachable.set()
        try:
            await backoff.wait(stop)
        except Stopped:
            raise asyncio.CancelledError("stopped while connecting") from None


def redacted_url(url: str) -> str:
    """The AMQP URL (one node, or several comma-separated) without its passwords, for logs."""
    return amqp_nodes.redact(url)


async def declare_broadcast(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    return await channel.declare_exchange(
        topology.broadcast_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )


async def declare_route(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    return await channel.declare_exchange(topology.route_exchange, aio_pika.ExchangeType.DIRECT, durable=True)


def topic_key(topic: str) -> str:
    return f"topic.{topic}"


def user_key(user_id: int) -> str:
    return f"user.{user_id}"


def routing_key(body: dict[str, Any]) -> str:
    """Where a message (or a topic's presence change) goes (CONTRACT §2 "Targeted routing"):
    `topic.<name>` or `user.<id>` on the route exchange, to the instances that bound it; ""
    for a broadcast, on the fanout exchange, to every instance."""
    if body.get("broadcast"):
        return ""
    if body.get("topic"):
        return topic_key(body["topic"])
    return user_key(body["user_id"])


@dataclass
class Outlets:
    """The exchanges messages leave a process by: the fanout for broadcasts, the direct route
    exchange for topics and users."""

    broadcast: AbstractExchange
    route: AbstractExchange

    async def publish(self, body: dict[str, Any] | bytes, message_id: str, key: str | list[str]) -> None:
        """Publish (confirmed) with routing key `key` ("" means every instance), or with several
        keys: a `pack` of messages for several recipients goes, once, to each instance bound to
        any of them (RabbitMQ's sender-selected distribution, the `BCC` header: unlike `CC`, the
        broker removes it before delivery, so instances do not decode a list of up to
        BROKER_BATCH_ITEMS keys with every pack)."""
        keys = [key] if isinstance(key, str) else key
        if not keys[0]:
            await publish(self.broadcast, body, message_id=message_id)
            return
        headers = {"BCC": keys[1:]} if len(keys) > 1 else None
        await publish(self.route, body, message_id=message_id, routing_key=keys[0], headers=headers)


async def declare_outlets(channel: AbstractChannel, topology: Topology) -> Outlets:
    return Outlets(await declare_broadcast(channel, topology), await declare_route(channel, topology))


async def declare_instance_queue(
    channel: AbstractChannel, topology: Topology, instance_id: str
) -> AbstractQueue:
    """The instance's own queue, expiring after its instance, consumed exclusively.

    On one node it is durable, so it outlives a broker restart. On a cluster (`AMQP_URL` naming
    several nodes) it is not: a durable classic queue lives on one node, and while that node is
    down it can be neither consumed nor declared again (404 "home node ... is down"), so the
    instance could reconnect nowhere until the node came back. A transient one is forgotten with
    its node and declared afresh wherever the instance reconnects; what it held is read back
    from the streams after the reconnection (`StreamTracker.resync`). A quorum queue would
    survive the node, but RabbitMQ 3.10 ignores exclusive consumers on quorum queues, and when
    one expires while still bound its publishers get nacks or lose their connection (README,
    "RabbitMQ cluster").

    A queue of that name declared otherwise (by a run with other settings, e.g. before the
    deployment became a cluster) is deleted and declared again: it holds nothing that the
    sockets of this new process need (they resume from the streams).
    """
    exchange = await declare_broadcast(channel, topology)
    name = topology.instance_queue(instance_id)
    durable = len(amqp_nodes.split(settings.AMQP_URL)) == 1
    arguments: dict[str, Any] = {"x-expires": settings.RT_INSTANCE_QUEUE_EXPIRES_MS}
    # Tried first on a channel of its own: the broker closes a channel that declares a queue
    # with other arguments, and `channel` must stay usable.
    connection = (await channel.get_underlay_channel()).connection
    probe = await connection.channel()
    try:
        await probe.queue_declare(name, durable=durable, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        logger.warning("replacing %s, declared otherwise (%s)", name, exc)
        cleaner = await connection.channel()
        await cleaner.queue_delete(name)
        await cleaner.close()
    else:
        await probe.close()
    queue = await channel.declare_queue(name, durable=durable, arguments=arguments)
    await queue.bind(exchange)
    return queue


async def declare_inbound(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """The inbound work queue, its retry delay queues and its dead-letter queue."""
    await channel.declare_queue(topology.dead_queue, durable=True, arguments={"x-queue-type": "quorum"})
    inbound = await channel.declare_queue(
        topology.inbound_queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": INBOUND_DELIVERY_LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topology.dead_queue,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    for delay in settings.RT_INBOUND_RETRY_DELAYS:
        # A frame waits here for its back-off, then the broker dead-letters it back to inbound.
        await channel.declare_queue(
            topology.retry_queue(delay),
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-message-ttl": delay * 1000,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": topology.inbound_queue,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
    return inbound


async def declare_topology(channel: AbstractChannel, topology: Topology) -> None:
    await declare_outlets(channel, topology)
    await declare_inbound(channel, topology)


async def publish(
    exchange: AbstractExchange,
    body: dict[str, Any] | bytes,
    *,
    message_id: str,
    routing_key: str = "",
    mandatory: bool = False,
    timeout: float | None = None,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish persistent JSON (a dict, or bytes already encoded) and wait for the broker's
    confirm, or raise BrokerUnavailable. A body that cannot be encoded raises TypeError."""
    timeout = settings.RT_PUBLISH_TIMEOUT if timeout is None else timeout
    message = json_message(body, message_id=message_id, headers=headers)
    try:
        await asyncio.wait_for(
            exchange.publish(message, routing_key=routing_key, mandatory=mandatory), timeout
        )
    except TimeoutError as exc:
        raise BrokerUnavailable(
            f"no confirm from the broker within {timeout:.1f}s", maybe_taken=True
        ) from exc
    except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}", maybe_taken=True) from exc
    except Exception as exc:
        # aiormq fails a publish whose connection closes under it with a bare Exception: the
        # outcome is as unknown as a lost confirm's, never a crash of the caller.
        logger.warning("publish failed unexpectedly (%s: %s)", type(exc).__name__, exc)
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}", maybe_taken=True) from exc


async def publish_to_queue(
    default_exchange: AbstractExchange,
    queue: str,
    body: dict[str, Any] | bytes,
    *,
    message_id: str,
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish to one queue by name (the default exchange), confirmed and mandatory: a queue
    that is missing makes BrokerUnavailable, not a silent drop."""
    await publish(
        default_exchange, body, message_id=message_id, routing_key=queue, mandatory=True, headers=headers
    )


async def settle(operation: Awaitable[Any], what: str) -> None:
    """Ack or reject, tolerating a channel that died meanwhile (the broker redelivers anyway)."""
    try:
        await operation
    except (
        aio_pika.exceptions.ChannelInvalidStateError,
        aio_pika.exceptions.AMQPError,
        ConnectionError,
    ) as exc:
        logger.info("could not settle %s (%s); the broker will redeliver it", what, exc)
