"""How `notifications` reaches the broker without knowing who holds the connection.

Services publish through `current()`. Whoever runs the process installs the publisher: the ASGI
module installs the web instance's bridge (its one connection, shared with the sockets), the WSGI
module a `ThreadedPublisher` of its own. With none installed, publishing is BrokerUnavailable.
"""

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from django.conf import settings

from notifications import broker
from notifications.broker import BrokerUnavailable

logger = logging.getLogger(__name__)


class Publisher(Protocol):
    async def publish_message(
        self, body: dict[str, Any] | bytes, message_id: str, key: str | list[str]
    ) -> None:
        """Publish a message (or a `pack`ed batch) for sockets, confirmed: `key` from
        `broker.routing_key` ("" for every instance), or the keys of a pack's recipients."""

    async def publish_inbound(self, body: dict[str, Any] | bytes, message_id: str) -> None:
        """Queue an inbound frame (or a `pack`ed batch) for the workers, confirmed and mandatory."""


_provider: Callable[[], Publisher] | None = None


def install(provider: Callable[[], Publisher] | None) -> Callable[[], Publisher] | None:
    """Make `provider()` this process's publisher (None: none); returns the one it replaces."""
    global _provider
    previous, _provider = _provider, provider
    return previous


def current() -> Publisher:
    if _provider is None:
        raise BrokerUnavailable("no publisher in this process")
    return _provider()


class ThreadedPublisher:
    """A confirmed-publish connection of its own, on an event loop in a daemon thread.

    For processes that hold no bridge (WSGI, management commands): callers on any loop or thread
    await it, the broker work runs on its own loop.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="publisher", daemon=True)
        self._thread.start()
        self._connection: AbstractRobustConnection | None = None
        self._outlets: broker.Outlets | None = None
        self._default: AbstractExchange | None = None
        self._connected = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)

    async def _connect(self) -> None:
        self._connection = await broker.connect()
        channel = await self._connection.channel(publisher_confirms=True)
        topology = broker.current_topology()
        await broker.declare_topology(channel, topology)
        self._outlets = await broker.declare_outlets(channel, topology)
        self._default = channel.default_exchange

    async def _run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if not self._connected.done():
            try:
                await asyncio.wait_for(asyncio.wrap_future(self._connected), settings.RT_PUBLISH_TIMEOUT)
            except TimeoutError:
                coroutine.close()
                raise BrokerUnavailable("not connected to RabbitMQ") from None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def publish_message(
        self, body: dict[str, Any] | bytes, message_id: str, key: str | list[str]
    ) -> None:
        await self._run(self._publish_message(body, message_id, key))

    async def publish_inbound(self, body: dict[str, Any] | bytes, message_id: str) -> None:
        await self._run(self._publish_inbound(body, message_id))

    def _connected_or_raise(self) -> None:
        if self._connection is None or not self._connection.connected.is_set():
            raise BrokerUnavailable("not connected to RabbitMQ")

    async def _publish_message(
        self, body: dict[str, Any] | bytes, message_id: str, key: str | list[str]
    ) -> None:
        self._connected_or_raise()
        assert self._outlets is not None
        await self._outlets.publish(body, message_id, key)

    async def _publish_inbound(self, body: dict[str, Any] | bytes, message_id: str) -> None:
        self._connected_or_raise()
        assert self._default is not None
        await broker.publish_to_queue(
            self._default, broker.current_topology().inbound_queue, body, message_id=message_id
        )
