"""What the admin's overview shows (CONTRACT §3 `/admin/overview/`): reads only.

- the processes of the deployment, from their leases (`InstanceLease`): web instances with their
  sockets and counters, workers with their lanes and frame counts; `up`, `late` (a renewal or
  two missed) or `gone` (the lease lapsed);
- the depth of the inbound queue, its retry queues and the dead-letter queue, read from the
  broker with passive declares on a connection of its own, bounded by BROKER_TIMEOUT: a broker
  that is down or does not answer is `unavailable`, and the rest of the page still shows;
- messages published, delivered and acked per minute over the last hour;
- the latest dead inbound frames with their errors.

Each part is read on its own, so one that fails (database or broker) leaves the others shown.
(Four parts, each short: together they are the page's one concept.)
"""

import asyncio
import datetime
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db.models import Count, QuerySet
from django.db.models.functions import TruncMinute
from django.utils import timezone

from notifications.broker import Topology, current_topology, redacted_url
from notifications.models import Delivery, InboundFrame, InstanceLease, Message

logger = logging.getLogger(__name__)

# Seconds the whole queue-depth read may take (connect included): past that the broker counts
# as unavailable, so an outage never hangs the page.
BROKER_TIMEOUT = 2.0
# Seconds a depth read is reused within one process: many open overview pages (each refreshing
# every few seconds) cost the broker one connection per this interval, not one per page.
DEPTHS_CACHE_SECONDS = 2.0
# Seconds the per-minute counts are reused: they scan up to an hour of rows.
RATES_CACHE_SECONDS = 10.0
# Leases are renewed every 3 s (consumers_app.leases.RENEW_SECONDS): one not renewed for this
# long has missed two renewals and shows as late, until its TTL lapses and it shows as gone.
LATE_AFTER_SECONDS = 7.0
# Minutes the rate charts cover.
RATE_MINUTES = 60
# An ack or a publish confirm comes within seconds of its message or delivery: the rows looked at
# for the last hour's acks and publishes are those created this much earlier at most, so the
# query stays on the created_at / delivered_at indexes.
CONFIRM_SLACK = datetime.timedelta(minutes=10)
# Dead frames listed.
DEAD_FRAMES_SHOWN = 20


# --- processes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """A web instance or worker as its lease shows it."""

    instance: str
    kind: str
    state: str  # up | no broker | late | gone
    started_at: datetime.datetime
    renewed_at: datetime.datetime
    expires_at: datetime.datetime
    renewed_ago: float
    stats: dict[str, Any]

    def stat(self, name: str) -> Any:
        return self.stats.get(name, "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "kind": self.kind,
            "state": self.state,
            "started_at": self.started_at.isoformat(),
            "renewed_at": self.renewed_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "stats": self.stats,
        }


def lease_state(lease: InstanceLease, now: datetime.datetime) -> str:
    if lease.expires_at < now:
        return "gone"
    if (now - lease.renewed_at).total_seconds() > LATE_AFTER_SECONDS:
        return "late"
    if isinstance(lease.stats, dict) and lease.stats.get("broker_connected") is False:
        return "no broker"  # alive, but not connected to RabbitMQ (its /readyz says 503)
    return "up"


def processes(now: datetime.datetime | None = None) -> list[Process]:
    """Every process with a lease row: live ones, and lapsed ones not yet removed by a live
    instance (a stopped process removes its own lease; the page remembers those it saw)."""
    now = now or timezone.now()
    return [
        Process(
            instance=lease.instance,
            kind=lease.kind,
            state=lease_state(lease, now),
            started_at=lease.started_at,
            renewed_at=lease.renewed_at,
            expires_at=lease.expires_at,
            renewed_ago=max((now - lease.renewed_at).total_seconds(), 0.0),
            stats=_whole_numbers(lease.stats),
        )
        for lease in InstanceLease.objects.order_by("kind", "instance")
    ]


def _whole_numbers(stats: Any) -> dict[str, Any]:
    """A lease's counters, those kept as floats (Prometheus counters) shown as whole numbers."""
    if not isinstance(stats, dict):
        return {}
    return {
        key: int(value) if isinstance(value, float) and value.is_integer() else value
        for key, value in stats.items()
    }


# --- queue depths --------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueDepth:
    name: str
    role: str  # inbound | retry | dead | instance
    messages: int | None = None  # None: the queue does not exist
    consumers: int | None = None

    @property
    def exists(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Depths:
    queues: list[QueueDepth] = field(default_factory=list)
    error: str = ""  # why the broker could not be read ("" when it was)
    read_at: float = 0.0  # time.monotonic() of the read

    @property
    def available(self) -> bool:
        return not self.error

    def as_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "error": self.error,
            "queues": [
                {"name": q.name, "role": q.role, "messages": q.messages, "consumers": q.consumers}
                for q in self.queues
            ],
        }


def watched_queues(topology: Topology, instance_ids: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(queue, role) of what the page shows: inbound, each retry queue, dead, then the
    queues of the live web instances (their backlog)."""
    names = [(topology.inbound_queue, "inbound")]
    names += [(topology.retry_queue(delay), "retry") for delay in settings.RT_INBOUND_RETRY_DELAYS]
    names.append((topology.dead_queue, "dead"))
    names += [(topology.instance_queue(instance), "instance") for instance in instance_ids]
    return names


_NODE_SEPARATOR = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)


def broker_nodes(amqp_url: str) -> list[str]:
    """The node URLs of `AMQP_URL` (one, or several of a cluster separated by commas)."""
    return [node.strip() for node in _NODE_SEPARATOR.split(amqp_url.strip()) if node.strip()]


async def read_depths(names: list[tuple[str, str]], amqp_url: str, timeout: float = BROKER_TIMEOUT) -> Depths:
    """Passive declares of `names` on a fresh connection (the first node that answers), all
    within `timeout` seconds; a broker that is down or silent gives `Depths(error=...)`."""
    nodes = broker_nodes(amqp_url)
    try:
        async with asyncio.timeout(timeout):
            return await _read_depths(names, nodes, timeout)
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except Exception as exc:
        why = _scrubbed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, nodes)
    logger.info("overview: broker unavailable (%s)", why)
    return Depths(error=f"broker unavailable: {why}", read_at=time.monotonic())


def _scrubbed(text: str, nodes: list[str]) -> str:
    """`text` without the nodes' passwords, should an error message quote a URL."""
    for node in nodes:
        password = urlsplit(node).password
        if password:
            text = text.replace(password, "***")
    return text


async def _read_depths(names: list[tuple[str, str]], nodes: list[str], timeout: float) -> Depths:
    connection = await _connect_any(nodes, timeout)
    try:
        queues: list[QueueDepth] = []
        channel = await connection.channel()
        for name, role in names:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                # 404 NOT_FOUND closes the channel: the queue does not exist (yet).
                queues.append(QueueDepth(name, role))
                channel = await connection.channel()
                continue
            result = queue.declaration_result
            queues.append(QueueDepth(name, role, result.message_count, result.consumer_count))
        return Depths(queues=queues, read_at=time.monotonic())
    finally:
        await asyncio.shield(connection.close())


async def _connect_any(nodes: list[str], timeout: float) -> aio_pika.abc.AbstractConnection:
    if not nodes:
        raise ValueError("AMQP_URL names no RabbitMQ node")
    last: Exception | None = None
    for node in nodes:
        try:
            return await aio_pika.connect(
                node,
                timeout=timeout,
                client_properties={"connection_name": f"{settings.RT_INSTANCE_ID} overview"},
            )
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            last = exc
            logger.info("overview: RabbitMQ node %s did not answer: %s", redacted_url(node), exc)
    assert last is not None
    raise last


T = TypeVar("T")


class _Cached:
    """One value per key, reused for `seconds` within this process (shared by its threads)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._values: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any, compute: Callable[[], T]) -> T:
        with self._lock:
            hit = self._values.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.seconds:
            return hit[1]
        value = compute()
        with self._lock:
            self._values = {key: (time.monotonic(), value)}  # one key at a time is all the page uses
        return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


_depths_cache = _Cached(DEPTHS_CACHE_SECONDS)
_rates_cache = _Cached(RATES_CACHE_SECONDS)


def queue_depths(instance_ids: Sequence[str] = (), *, fresh: bool = False) -> Depths:
    """The watched queues' depths now (reused for DEPTHS_CACHE_SECONDS unless `fresh`)."""
    names = watched_queues(current_topology(), sorted(instance_ids))
    url = settings.AMQP_URL

    def read() -> Depths:
        return async_to_sync(read_depths)(names, url)

    key = (url, tuple(names))
    return read() if fresh else _depths_cache.get(key, read)


# --- rates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """Counts per minute, oldest first, one for each of the last RATE_MINUTES minutes."""

    name: str
    label: str
    minutes: list[datetime.datetime]
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def peak(self) -> int:
        return max(self.counts, default=0)

    @property
    def last(self) -> int:
        """The last whole minute (the current one is still filling)."""
        return self.counts[-2] if len(self.counts) > 1 else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "total": self.total,
            "per_minute": [
                [minute.isoformat(), count] for minute, count in zip(self.minutes, self.counts, strict=True)
            ],
        }


def _per_minute(rows: QuerySet[Any], column: str, start: datetime.datetime) -> dict[datetime.datetime, int]:
    counted = (
        rows.filter(**{f"{column}__gte": start})
        .annotate(minute=TruncMinute(column))
        .values("minute")
        .annotate(n=Count("pk"))
        .order_by()
        .values_list("minute", "n")
    )
    return {minute: n for minute, n in counted}


def rates(now: datetime.datetime | None = None) -> list[Series]:
    """Messages published (broker confirmed), delivered (to sockets) and acked (by clients), per
    minute over the last RATE_MINUTES minutes; every query is bounded by an indexed column."""
    now = now or timezone.now()
    current = now.replace(second=0, microsecond=0)
    minutes = [current - datetime.timedelta(minutes=n) for n in range(RATE_MINUTES - 1, -1, -1)]
    start = minutes[0]
    published = _per_minute(
        Message.objects.filter(created_at__gte=start - CONFIRM_SLACK), "published_at", start
    )
    delivered = _per_minute(Delivery.objects.all(), "delivered_at", start)
    acked = _per_minute(Delivery.objects.filter(delivered_at__gte=start - CONFIRM_SLACK), "acked_at", start)
    return [
        Series(name, label, minutes, [counts.get(minute, 0) for minute in minutes])
        for name, label, counts in (
            ("published", "Messages published", published),
            ("delivered", "Delivered to sockets", delivered),
            ("acked", "Acked by clients", acked),
        )
    ]


def cached_rates() -> list[Series]:
    return _rates_cache.get("rates", rates)


# --- dead frames ---------------------------------------------------------------------------


def dead_frames(limit: int = DEAD_FRAMES_SHOWN) -> list[InboundFrame]:
    """The latest dead inbound frames (by when they died), with their senders."""
    return list(
        InboundFrame.objects.filter(status=InboundFrame.Status.DEAD)
        .select_related("user")
        .order_by("-processed_at", "-accepted_at")[:limit]
    )


def dead_count() -> int:
    return InboundFrame.objects.filter(status=InboundFrame.Status.DEAD).count()


# --- the whole page ------------------------------------------------------------------------


@dataclass
class Part:
    """One part of the page: its value, or why it could not be read."""

    value: Any = None
    error: str = ""


def read_part(what: str, read: Callable[[], T]) -> Part:
    try:
        return Part(read())
    except Exception as exc:
        logger.warning("overview: could not read %s: %s", what, exc)
        return Part(error=f"{type(exc).__name__}: {exc}")


@dataclass
class Snapshot:
    generated_at: datetime.datetime
    processes: Part
    depths: Depths
    rates: Part
    dead: Part
    dead_total: Part

    @property
    def webs(self) -> list[Process]:
        return [p for p in self.processes.value or [] if p.kind == InstanceLease.Kind.WEB]

    @property
    def workers(self) -> list[Process]:
        return [p for p in self.processes.value or [] if p.kind == InstanceLease.Kind.WORKER]


def snapshot() -> Snapshot:
    """Everything the page shows, each part read on its own."""
    now = timezone.now()
    procs = read_part("the leases", lambda: processes(now))
    live_webs = [p.instance for p in procs.value or [] if p.kind == "web" and p.state != "gone"]
    return Snapshot(
        generated_at=now,
        processes=procs,
        depths=queue_depths(live_webs),
        rates=read_part("the message rates", cached_rates),
        dead=read_part("the dead frames", dead_frames),
        dead_total=read_part("the dead frame count", dead_count),
    )
