"""The per-instance broker bridge: one RabbitMQ connection per web process, shared by all sockets.

It consumes the instance's own queue (bound to the broadcasts and to the topics and users its
sockets need) and hands each message to its stream's ordered delivery (`streams`). It also
publishes (confirmed) for the API, for presence and for inbound `send` frames. Daphne runs no
ASGI lifespan, so the bridge starts once per process from the ASGI module (or lazily).

It is the one interface sockets use: registry, streams, bindings, presence, the delivery log and
inbound queueing sit behind it, each in its own module; its methods are short delegations to
them, which is most of its length.
"""

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from consumers_app.account_watch import watch_accounts
from consumers_app.bindings import Bindings
from consumers_app.consumer_cancel import ConsumerCancelWatch
from consumers_app.inbound_submitter import InboundSubmitter
from consumers_app.outbound import corked
from consumers_app.presence import PresenceTracker
from consumers_app.registry import Socket, SocketRegistry
from consumers_app.streams import StreamTracker, message_id
from notifications import broker, metrics
from notifications.broker import BrokerUnavailable
from notifications.delivery_log import DeliveryLogWriter
from notifications.services import presence as presence_service
from notifications.services.inbound import NewInbound
from notifications.services.streams import BROADCAST, Recovery, legacy_stream, topic_stream, user_stream

logger = logging.getLogger(__name__)

# Unacked messages the broker may push to this instance at once: enough to keep the fan-out
# busy while acks travel back, small enough that a restart redelivers little.
INSTANCE_PREFETCH = 256
# Message ids remembered to drop redeliveries (a reconnect redelivers what was not yet acked,
# and a worker may republish a reply after a crash).
RECENT_IDS = 20_000


class InstanceBridge:
    def __init__(self) -> None:
        self.instance_id: str = settings.RT_INSTANCE_ID
        self.topology = broker.current_topology()
        self.registry = SocketRegistry()
        self.log = DeliveryLogWriter(self.instance_id)
        self.streams = StreamTracker(self.registry, self.log)
        self.presence = PresenceTracker(self.instance_id, self.publish_message, self._lease_stats)
        self.received = 0
        self.inbound = InboundSubmitter(self)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connection: AbstractRobustConnection | None = None
        self._outlets: broker.Outlets | None = None
        self._route: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._cancels: ConsumerCancelWatch | None = None
        self.bindings = Bindings()
        self._default: AbstractExchange | None = None
        self._start_task: asyncio.Task | None = None
        self._starting_since = 0.0  # loop time of ensure_started
        self._account_watch: asyncio.Task | None = None
        self._started = asyncio.Event()
        self._unreachable = asyncio.Event()  # a first round of connection attempts failed
        self._stop = asyncio.Event()
        self._recent: OrderedDict[str, None] = OrderedDict()

    # --- lifecycle -------------------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start connecting in the running loop, once."""
        if self._start_task is None:
            self.loop = asyncio.get_running_loop()
            self._starting_since = self.loop.time()
            self._start_task = self.loop.create_task(self._start(), name="bridge-start")

    @property
    def ready(self) -> bool:
        return (
            self._started.is_set()
            and self.connection is not None
            and not self.connection.is_closed
            and self.connection.connected.is_set()
        )

    async def wait_started(self, within: float) -> None:
        """Wait until it has connected and consumed its queue once, unless the broker did not
        answer its first attempts, and at most until `within` seconds after it began starting
        (a broker down at start delays nothing past that; a later outage, nothing at all)."""
        self.ensure_started()
        assert self.loop is not None
        left = self._starting_since + within - self.loop.time()
        if left <= 0 or self._started.is_set() or self._unreachable.is_set():
            return
        waits = [asyncio.ensure_future(self._started.wait()), asyncio.ensure_future(self._unreachable.wait())]
        try:
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def wait_ready(self, timeout: float) -> bool:
        self.ensure_started()
        try:
            await asyncio.wait_for(self._started.wait(), timeout)
        except TimeoutError:
            return False
        return self.ready

    async def _start(self) -> None:
        await self.presence.begin()
        self.connection = await broker.connect(self._stop, self._unreachable)
        self.connection.close_callbacks.add(self._on_connection_lost)
        self.connection.reconnect_callbacks.add(self._on_reconnected)

        setup = await self.connection.channel()
        await broker.declare_topology(setup, self.topology)
        await setup.close()

        consume = await self.connection.channel()
        await consume.set_qos(prefetch_count=INSTANCE_PREFETCH)
        queue = await broker.declare_instance_queue(consume, self.topology, self.instance_id)
        self._route = await broker.declare_route(consume, self.topology)
        self._queue = queue
        self.bindings.attach(queue, self._route)
        tag = await queue.consume(self._on_message, exclusive=True)
        self._cancels = ConsumerCancelWatch(consume, self._after_consumer_restored, self._stop)
        await self._cancels.watch(tag)

        publish = await self.connection.channel(publisher_confirms=True)
        self._outlets = await broker.declare_outlets(publish, self.topology)
        self._default = publish.default_exchange

        self.log.start()
        self._account_watch = asyncio.get_running_loop().create_task(
            watch_accounts(self.registry, self._stop), name="account-watch"
        )
        self._started.set()
        self.presence.start()
        metrics.broker_connected.set(1)
        logger.info("bridge ready: consuming %s", queue.name)

    def _on_connection_lost(self, *args: Any) -> None:
        metrics.broker_connected.set(0)
        if self._stop.is_set():
            return
        logger.warning("lost the RabbitMQ connection; reconnecting (sockets stay open)")

    def _on_reconnected(self, *args: Any) -> None:
        metrics.broker_connected.set(1)
        logger.info("reconnected to RabbitMQ; queue and bindings restored")
        if self._queue is not None and self._route is not None:
            self.bindings.attach(self._queue, self._route)  # what was asked while it was away
        # What was lost with a node (or never routed while away) is read back from the streams.
        asyncio.get_running_loop().create_task(self.streams.resync(), name="streams-resync")

    async def _after_consumer_restored(self) -> None:
        """The broker had cancelled this instance's consumer: aio-pika declared, bound and consumed
        the queue again; what was routed while it was missing is read back from the streams."""
        if self._queue is not None and self._route is not None:
            self.bindings.attach(self._queue, self._route)
        await self.streams.resync()

    async def stop(self) -> None:
        self._stop.set()
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            try:
                await self._start_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._account_watch is not None:
            self._account_watch.cancel()
        if self._started.is_set():
            # A stopping (drained) instance takes its sockets' presence away at once, and its
            # bindings before its queue expires.
            await self.presence.stop(drop=True)
            try:
                await asyncio.wait_for(self.bindings.unbind_all(), 5.0)
            except Exception as exc:
                logger.warning("could not unbind before stopping: %s", exc)
        await self.log.stop()
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()
        metrics.broker_connected.set(0)

    # --- sockets -------------------------------------------------------------------------

    async def register(self, socket: Socket) -> None:
        """A new socket: its user's stream and the broadcasts are held for it until it resumes
        them or `release_holds` (see StreamTracker).

        Returns once both streams' positions are known here, so that every message accepted
        after the socket's welcome is one it gets.
        """
        self.registry.add(socket)
        metrics.connections.set(len(self.registry))
        await self.bindings.acquire(broker.user_key(socket.user_id), confirmed=False)
        own = (BROADCAST, user_stream(socket.user_id))
        for stream in own:
            self.streams.hold(socket, stream)
        await asyncio.gather(*(self.streams.loaded(stream, settings.RT_PUBLISH_TIMEOUT) for stream in own))

    def release_holds(self, socket: Socket) -> None:
        """The socket will not resume: its own streams go live."""
        self.streams.release(socket, BROADCAST)
        self.streams.release(socket, user_stream(socket.user_id))

    def unregister(self, socket: Socket) -> None:
        """Forget a socket (closed, or its consumer failed); harmless if it is already gone."""
        self.streams.leave(socket, BROADCAST)
        self.streams.leave(socket, user_stream(socket.user_id))
        for topic in list(self.registry.topics_of.get(socket, ())):
            self.unsubscribe(socket, topic)
        if socket in self.registry.sockets:
            self.bindings.release(broker.user_key(socket.user_id))
        self.registry.remove(socket)
        metrics.connections.set(len(self.registry))

    async def subscribe(
        self,
        socket: Socket,
        topic: str,
        since: tuple[int, str] | None,
        answer: Callable[[Recovery], None],
        *,
        watch_presence: bool = False,
    ) -> Recovery | None:
        """Subscribe the socket to `topic`: `answer`, then what it missed since `since`, then live.

        It counts in the topic's presence; with `watch_presence` it gets the topic's joins and
        leaves too.
        """
        if topic not in self.topics_of(socket):
            # Bound before anything else: no message published from here on can miss the socket.
            await self.bindings.acquire(broker.topic_key(topic))
            self.registry.subscribe(socket, topic)
            self.presence.add(topic, socket.user_id)
            # Counted everywhere before `subscribed`: a `presence` asked after it lists the socket.
            await self.presence.flush()
        if watch_presence:
            self.presence.watch(socket, topic)
        else:
            self.presence.unwatch(socket, topic)
        return await self.streams.join(socket, topic_stream(topic), since, answer)

    def unsubscribe(self, socket: Socket, topic: str) -> None:
        self.streams.leave(socket, topic_stream(topic))
        self.presence.unwatch(socket, topic)
        if topic in self.topics_of(socket):
            self.presence.remove(topic, socket.user_id)
            self.bindings.release(broker.topic_key(topic))
        self.registry.unsubscribe(socket, topic)

    async def presence_of(self, topic: str) -> list[tuple[str, int]]:
        """Who is on `topic` now, every instance counted (this one's latest changes included)."""
        await self.presence.flush()
        return await database_sync_to_async(presence_service.members)(topic)

    async def resume(
        self, socket: Socket, stream: str, since: tuple[int, str], answer: Callable[[Recovery], None]
    ) -> Recovery | None:
        """Recover the socket's own `user` or `broadcast` stream after a reconnect."""
        name = BROADCAST if stream == BROADCAST else user_stream(socket.user_id)
        return await self.streams.join(socket, name, since, answer)

    def topics_of(self, socket: Socket) -> set[str]:
        return self.registry.topics_of.get(socket, set())

    def record_ack(self, message_id: uuid.UUID, connection_id: str, when: datetime) -> None:
        self.log.record_ack(message_id, connection_id, when)

    async def submit_inbound(self, frame: NewInbound) -> None:
        """Record and queue a socket's `send` frame with those of the other sockets (see InboundSubmitter)."""
        await self.inbound.submit(frame)

    def _lease_stats(self) -> dict[str, Any]:
        """What the admin's overview shows of this instance (written with each lease renewal)."""
        return {
            "broker_connected": self.ready,
            "sockets": len(self.registry),
            "subscriptions": sum(len(topics) for topics in self.registry.topics_of.values()),
            "streams": len(self.streams.states),
            "messages_received": self.received,
            "deliveries": self.streams.delivered,
            "presence_members": len(self.presence.local),
        }

    # --- broker -> sockets ---------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Everything up to the ack runs without yielding, so messages reach sockets in queue order.
        # Whatever a message holds, it is acked: an unreadable one is counted and logged, never
        # left to block the queue (CONTRACT §5.6).
        try:
            bodies = broker.unpack(broker.decode(message.body), broker.MESSAGES)
        except (ValueError, TypeError) as exc:
            metrics.messages_malformed.inc()
            logger.error("dropping a malformed message from %s: %s", self.topology.broadcast_exchange, exc)
            await broker.settle(message.ack(), "a broadcast message")
            return
        metrics.messages_received.inc(len(bodies))
        self.received += len(bodies)
        with corked():  # a socket's frames of this message in one write
            self._hand_out(bodies, message.message_id)
        await broker.settle(message.ack(), "a broadcast message")

    def _hand_out(self, bodies: list[dict[str, Any]], carrier: str | None) -> None:
        now = timezone.now()  # the delivery log's time for every message of this broker message
        for body in bodies:
            try:
                if "presence" in body:
                    self.presence.heard(body)
                    continue
                message_id(body)
                if body.get("seq") is not None:
                    self.streams.arrive(body, now)
                elif not self._seen(body["id"]):  # unnumbered (from an older publisher)
                    self.streams.emit_unnumbered(legacy_stream(body), body)
                else:
                    metrics.messages_duplicate.inc()
            except Exception as exc:
                metrics.messages_malformed.inc()
                logger.error("dropping a malformed message in %s: %s: %s", carrier, type(exc).__name__, exc)

    def _seen(self, message_id: str) -> bool:
        if message_id in self._recent:
            return True
        self._recent[message_id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        return False

    # --- publishing ----------------------------------------------------------------------

    def _exchange(self, exchange: AbstractExchange | None) -> AbstractExchange:
        if exchange is None or not self.ready:
            raise BrokerUnavailable("not connected to RabbitMQ")
        return exchange

    async def publish_message(
        self, body: dict[str, Any] | bytes, message_id: str, key: str | list[str]
    ) -> None:
        if self._outlets is None or not self.ready:
            raise BrokerUnavailable("not connected to RabbitMQ")
        await self._outlets.publish(body, message_id, key)

    async def publish_inbound(self, body: dict[str, Any] | bytes, message_id: str) -> None:
        await broker.publish_to_queue(
            self._exchange(self._default), self.topology.inbound_queue, body, message_id=message_id
        )


_bridge: InstanceBridge | None = None


def get_bridge() -> InstanceBridge:
    """This process's bridge (created on first call, started by `ensure_bridge`)."""
    global _bridge
    if _bridge is None:
        _bridge = InstanceBridge()
    return _bridge


def ensure_bridge() -> InstanceBridge:
    """The bridge, started in the running loop (a new one if an old loop owned the last one)."""
    global _bridge
    loop = asyncio.get_running_loop()
    bridge = get_bridge()
    if bridge.loop is not None and bridge.loop is not loop and bridge.loop.is_closed():
        _bridge = bridge = InstanceBridge()
    bridge.ensure_started()
    return bridge


async def reset_bridge() -> None:
    """Stop and forget the bridge (tests; a drained process)."""
    global _bridge
    bridge, _bridge = _bridge, None
    if bridge is not None:
        await bridge.stop()
