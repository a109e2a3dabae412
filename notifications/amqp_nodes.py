"""`AMQP_URL` naming several nodes of one RabbitMQ cluster, and a connection that fails over.

`AMQP_URL` holds one URL, or several separated by commas (CONTRACT §1): a process connects to
one that answers and moves to another when its node fails. aio-pika's `connect_robust` takes a
single URL, so `FailoverConnection` is its RobustConnection (which, after a reconnection,
restores the channels, exchanges, queues, bindings and consumers declared on it) that moves to
the next node of the list before every reconnection attempt. Nothing here imports Django.
"""

import asyncio
import logging
import random
import re
from collections.abc import Sequence
from typing import Any

from aio_pika.connection import make_url
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from notifications.backoff import Backoff

logger = logging.getLogger(__name__)

# Seconds aio-pika waits after a failed attempt before the next one (on the next node). Its own
# default, 5 s, is for one node; with several, the next one usually answers at once.
RECONNECT_INTERVAL = 1.0
# Seconds to wait, after losing the connection to one node of several, before connecting to the
# next one: long enough for the cluster to elect new leaders for the quorum queues the lost node
# led. RabbitMQ 3.10 gives a channel that publishes to a quorum queue for the first time while
# the queue's record still names a dead leader nothing but nacks until that node returns
# (rabbit_fifo_client asks the dead node, then never another), and every channel is new after a
# reconnection.
SETTLE_DELAY = 2.0
# Largest extra wait (seconds) between rounds of failed attempts over every node: short, since a
# broker that comes back should get its clients back soon.
ROUND_BACKOFF_MAX = 5.0

# A comma followed by the scheme of the next URL (`amqp://`, ...): a comma inside a password is
# left alone.
_SEPARATOR = re.compile(r"\s*,\s*(?=[a-z][a-z0-9+.-]*://)", re.IGNORECASE)
_SCHEME = re.compile(r"^amqps?://", re.IGNORECASE)


def split(amqp_url: str) -> list[str]:
    """The node URLs of `amqp_url` as written (empty items dropped), unchecked."""
    parts = (part.strip().strip(",").strip() for part in _SEPARATOR.split(amqp_url.strip()))
    return [part for part in parts if part]


def parse(amqp_url: str) -> list[str]:
    """The node URLs of `AMQP_URL`, in the order given; ValueError if there is none, or if one is
    not an `amqp://` or `amqps://` URL (the message never shows a password)."""
    nodes = split(amqp_url)
    if not nodes:
        raise ValueError("AMQP_URL names no RabbitMQ node")
    for node in nodes:
        if not _SCHEME.match(node):
            raise ValueError(f"AMQP_URL: {redact_one(node)!r} is not an amqp:// or amqps:// URL")
    return nodes


def redact_one(url: str) -> str:
    """One node URL without its password (everything between the user and the last `@`)."""
    if "@" not in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***"
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def redact(amqp_url: str) -> str:
    """`AMQP_URL` (one node or several) without any password, for logs."""
    return ",".join(redact_one(node) for node in split(amqp_url)) or amqp_url


def random_start(count: int) -> int:
    """Where a process begins its first round over `count` nodes: at random, so that the
    processes of a deployment spread their connections over the cluster."""
    return random.randrange(count)


def rotation(count: int, start: int) -> list[int]:
    """The indexes 0..count-1 once each, beginning at `start` and wrapping around."""
    return [(start + step) % count for step in range(count)]


class FailoverConnection(RobustConnection):
    """A RobustConnection over several nodes: each reconnection attempt goes to the next one.

    The first attempt uses `nodes[first]`; after a lost connection or a failed attempt, the next
    node of the list (wrapping around), so a node that died is tried again last. Once every node
    has failed in a row, a capped, jittered backoff is added to aio-pika's fixed interval, so
    many processes that lost a whole cluster do not hammer it in step. With several nodes, the
    first attempt after losing a working connection waits `settle_delay` (see SETTLE_DELAY).
    """

    def __init__(
        self, nodes: Sequence[URL], first: int = 0, *, settle_delay: float | None = None, **kwargs: Any
    ) -> None:
        if not nodes:
            raise ValueError("no RabbitMQ node to connect to")
        kwargs.setdefault("reconnect_interval", RECONNECT_INTERVAL)
        super().__init__(nodes[first], **kwargs)
        self.nodes = list(nodes)
        self.node_index = first
        self.settle_delay = settle_delay if settle_delay is not None else SETTLE_DELAY * (len(nodes) > 1)
        self._attempts = 0
        self._failures = 0
        self._round_backoff = Backoff(maximum=ROUND_BACKOFF_MAX)

    @property
    def node(self) -> str:
        """The URL of the node this connection uses (or tries next), without its password."""
        return redact_one(str(self.nodes[self.node_index].with_query(None)))

    async def _RobustConnection__connect_transport(self) -> None:
        # aio-pika 10 calls this private method for every connection attempt, the first one and
        # every reconnection (`RobustConnection.__connection_factory`), and nothing public runs
        # before an attempt: tests/unit/test_amqp_nodes.py checks that it is still there.
        if self._attempts:
            if not self._failures and self.settle_delay:
                # The connection that worked was lost: let the cluster settle first.
                logger.info("lost RabbitMQ node %s; trying the next in %.1fs", self.node, self.settle_delay)
                await asyncio.sleep(self.settle_delay)
            self.node_index = (self.node_index + 1) % len(self.nodes)
            self.url = self.nodes[self.node_index]
            if self._failures and self._failures % len(self.nodes) == 0:
                await asyncio.sleep(self._round_backoff.next_delay())
            if len(self.nodes) > 1:
                logger.info(
                    "trying RabbitMQ node %s (%d of %d)", self.node, self.node_index + 1, len(self.nodes)
                )
        self._attempts += 1
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except BaseException:
            self._failures += 1
            raise

    async def _on_connected(self) -> None:
        await super()._on_connected()
        if self._failures or self.connection_attempt > 1:
            logger.info("reconnected to RabbitMQ node %s", self.node)
        self._failures = 0
        self._round_backoff.reset()


async def connect(
    nodes: Sequence[str], first: int = 0, *, timeout: float | None = None, **kwargs: Any
) -> FailoverConnection:
    """A FailoverConnection over `nodes`, connected to `nodes[first]` (or raising, as aio-pika's
    `connect_robust` does when its first attempt fails).

    `kwargs` are what `connect_robust` takes besides the URL (`heartbeat`, `client_properties`,
    ...): the URL query parameters go into every node's URL, as `connect_robust` puts them into
    its one URL.
    """
    client_properties = kwargs.pop("client_properties", None)
    reconnect_interval = kwargs.pop("reconnect_interval", RECONNECT_INTERVAL)
    urls = [make_url(node, **kwargs) for node in nodes]
    connection = FailoverConnection(
        urls,
        first,
        reconnect_interval=reconnect_interval,
        **({"client_properties": client_properties} if client_properties is not None else {}),
    )
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        await asyncio.shield(connection.close())
        raise
    return connection
