"""The routing keys this instance's queue is bound to: the topics and users it holds sockets of.

A key is bound when the first local socket needs it, and the binding is confirmed (bind-ok)
before the socket is told it is on the stream, so no message published after that can miss it.
It is unbound UNBIND_AFTER_SECONDS after the last socket left, so a flapping socket does not
churn bindings (every binding is replicated to every node of a cluster). While the broker is
away, keys are only remembered; the robust connection re-binds what was bound, and what was
asked meanwhile is bound on reconnection.
"""

import asyncio
import logging

from aio_pika.abc import AbstractExchange, AbstractQueue
from aio_pika.exceptions import AMQPError

from notifications import metrics
from notifications.broker import BrokerUnavailable

logger = logging.getLogger(__name__)

# A key stays bound this long after its last local socket left.
UNBIND_AFTER_SECONDS = 30.0
# Longest wait for a bind-ok before the socket is told the broker is unavailable.
BIND_TIMEOUT_SECONDS = 10.0


class Bindings:
    def __init__(self) -> None:
        self.users: dict[str, int] = {}  # key -> local sockets that need it
        self.bound: set[str] = set()
        self._binding: dict[str, asyncio.Future[None]] = {}
        self._unbinding: dict[str, asyncio.TimerHandle] = {}
        self.queue: AbstractQueue | None = None
        self.exchange: AbstractExchange | None = None

    def attach(self, queue: AbstractQueue, exchange: AbstractExchange) -> None:
        """The instance queue is declared (or declared again): bind what is wanted."""
        self.queue, self.exchange = queue, exchange
        for key in list(self.users):
            if key not in self.bound and key not in self._binding:
                asyncio.get_running_loop().create_task(self._bind_quietly(key))

    async def acquire(self, key: str, *, confirmed: bool = True) -> None:
        """A socket needs `key`: returns once the queue is bound to it.

        With `confirmed`, raise BrokerUnavailable (and need nothing) if the binding cannot be
        made now; without, the key stays wanted and is bound when the broker is back.
        """
        self.users[key] = self.users.get(key, 0) + 1
        timer = self._unbinding.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self.bound:
            return
        try:
            if self.queue is None:
                raise BrokerUnavailable("not connected to RabbitMQ")
            pending = self._binding.get(key)
            if pending is None:
                pending = self._binding[key] = asyncio.get_running_loop().create_task(self._bind(key))
            await asyncio.wait_for(asyncio.shield(pending), BIND_TIMEOUT_SECONDS)
        except (TimeoutError, AMQPError, ConnectionError, RuntimeError, BrokerUnavailable) as exc:
            if not confirmed:
                return
            self.release(key)
            raise BrokerUnavailable(f"could not bind {key}: {exc}") from exc

    def release(self, key: str) -> None:
        """A socket no longer needs `key`; the last one starts the unbind timer."""
        count = self.users.get(key, 0) - 1
        if count > 0:
            self.users[key] = count
            return
        self.users.pop(key, None)
        if key in self.bound and key not in self._unbinding:
            loop = asyncio.get_running_loop()
            self._unbinding[key] = loop.call_later(
                UNBIND_AFTER_SECONDS, lambda: loop.create_task(self._unbind(key))
            )

    async def _bind(self, key: str) -> None:
        try:
            assert self.queue is not None and self.exchange is not None
            await self.queue.bind(self.exchange, routing_key=key)
            self.bound.add(key)
            metrics.bindings.set(len(self.bound))
        finally:
            self._binding.pop(key, None)

    async def _bind_quietly(self, key: str) -> None:
        pending = self._binding[key] = asyncio.get_running_loop().create_task(self._bind(key))
        try:
            await pending
        except Exception as exc:
            logger.warning("could not bind %s (%s); it is bound on the next reconnection", key, exc)

    async def _unbind(self, key: str) -> None:
        self._unbinding.pop(key, None)
        if key in self.users or key not in self.bound or self.queue is None or self.exchange is None:
            return
        try:
            await self.queue.unbind(self.exchange, routing_key=key)
            self.bound.discard(key)
            metrics.bindings.set(len(self.bound))
        except Exception as exc:
            logger.warning("could not unbind %s: %s", key, exc)

    async def unbind_all(self) -> None:
        """Before the queue goes away for good: a queue with many bindings is slow to delete
        on a cluster (rabbitmq-server#12926), so its bindings go first."""
        for timer in self._unbinding.values():
            timer.cancel()
        self._unbinding.clear()
        self.users.clear()
        for key in list(self.bound):
            await self._unbind(key)
