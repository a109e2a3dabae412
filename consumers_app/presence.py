"""Presence in a web instance: its sockets' counts per (topic, user), its lease, dead peers.

Local changes are netted and written every FLUSH_SECONDS (`notifications.services.presence`);
the joins and leaves the database reports go to every instance over the broker, and each
instance hands them to its sockets that subscribed with `"presence": true`. The instance renews
its lease (`consumers_app.leases`); every instance looks for lapsed leases and removes a dead
peer's members, so their `leave`s go out within the lease's TTL + EXPIRY_CHECK_SECONDS.
"""

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.db import connection

from consumers_app.leases import RENEW_SECONDS, LeaseRenewer
from consumers_app.registry import Socket
from notifications import jsonutil, metrics
from notifications.backoff import Backoff
from notifications.broker import topic_key
from notifications.services import presence as service
from notifications.services.presence import Change, Key

logger = logging.getLogger(__name__)

# Local changes are written this often (and netted in between): joins and leaves within 2 s.
FLUSH_SECONDS = 0.1
# Lapsed leases (consumers_app.leases) are looked for this often. A killed instance's users
# leave within its lease's TTL + this (+ a flush): under 20 s.
EXPIRY_CHECK_SECONDS = 2.0

Publish = Callable[[bytes, str, str], Awaitable[None]]  # (body, message id, routing key)


class PresenceTracker:
    def __init__(self, instance_id: str, publish: Publish, stats: Callable[[], dict[str, Any]]) -> None:
        self.instance_id = instance_id
        self._publish = publish
        self.lease = LeaseRenewer(instance_id, "web", stats)
        self.local: dict[Key, int] = {}
        self.watchers: dict[str, set[Socket]] = defaultdict(set)
        self._deltas: dict[Key, int] = {}
        self._versions: dict[tuple[str, str], int] = {}  # (topic, username) -> last version heard
        self._flushing: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._begun = asyncio.Event()
        self._writing = asyncio.Lock()
        self._stale: list[Change] = []

    # --- this instance's sockets ---------------------------------------------------------

    def add(self, topic: str, user_id: int) -> None:
        self._count((topic, user_id), +1)

    def remove(self, topic: str, user_id: int) -> None:
        self._count((topic, user_id), -1)

    def _count(self, key: Key, delta: int) -> None:
        count = self.local.get(key, 0) + delta
        if count > 0:
            self.local[key] = count
        else:
            self.local.pop(key, None)
        metrics.presence_members.set(len(self.local))
        if (count > 0) != (count - delta > 0):  # this instance's first socket came or last one went
            self._deltas[key] = self._deltas.get(key, 0) + delta
            self._schedule_flush()

    def watch(self, socket: Socket, topic: str) -> None:
        self.watchers[topic].add(socket)

    def unwatch(self, socket: Socket, topic: str) -> None:
        sockets = self.watchers.get(topic)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self.watchers[topic]
                for key in [key for key in self._versions if key[0] == topic]:
                    del self._versions[key]

    # --- writing, and telling the others -------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_soon(), name="presence-flush")

    async def _flush_soon(self) -> None:
        """Write what changed in the last FLUSH_SECONDS, retrying while the database is down."""
        backoff = Backoff(RENEW_SECONDS)
        await asyncio.sleep(FLUSH_SECONDS)
        while self._deltas:
            try:
                await self.flush()
            except Exception as exc:
                logger.warning("could not write %d presence changes (%s); retrying", len(self._deltas), exc)
                await backoff.wait()

    async def flush(self) -> None:
        """Write the netted local changes now and announce what they change cluster-wide.

        Raises the database's error (the changes stay, for the next try).
        """
        await self._begun.wait()
        async with self._writing:
            while self._deltas:
                deltas, self._deltas = self._deltas, {}
                try:
                    changes = await database_sync_to_async(service.apply)(self.instance_id, deltas)
                except BaseException:
                    for key, delta in deltas.items():
                        self._deltas[key] = self._deltas.get(key, 0) + delta
                    raise
                await self.announce(changes)

    async def announce(self, changes: list[Change]) -> None:
        for change in changes:
            try:
                await self._publish(
                    jsonutil.dumps(change.body()),
                    f"presence-{change.topic}-{change.version}",
                    topic_key(change.topic),  # to the instances with sockets on the topic
                )
            except Exception as exc:
                # The snapshot (`presence` frame, API) stays right; only this event is missed.
                logger.warning(
                    "could not announce %s of %s on %s: %s", change.kind, change.username, change.topic, exc
                )

    def heard(self, body: dict[str, Any]) -> None:
        """A join or leave from the broker: to the sockets that watch its topic, once, in order."""
        topic, user, kind, version = body["topic"], body["user"], body["presence"], body["version"]
        if kind not in ("join", "leave") or not isinstance(version, int):
            raise ValueError(f"not a presence change: {kind!r}")
        sockets = self.watchers.get(topic)
        if not sockets:
            return
        key = (str(topic), str(user))
        if self._versions.get(key, 0) >= version:
            return  # an older change heard after a newer one
        self._versions[key] = version
        frame = jsonutil.dumps({"type": kind, "topic": topic, "user": user})
        for socket in list(sockets):
            socket.deliver(frame)

    # --- leases --------------------------------------------------------------------------

    async def begin(self) -> None:
        """At start, before any change of this instance is written: whatever a previous process
        of the same name left counted is taken away (its leaves are announced by `start`)."""
        backoff = Backoff(RENEW_SECONDS)
        while True:
            try:
                self._stale = await database_sync_to_async(service.drop_instance)(self.instance_id)
                await self.lease.renew()
                break
            except Exception as exc:
                logger.warning("cannot register this instance's lease (%s); retrying", exc)
                await backoff.wait()
        self._begun.set()

    def start(self) -> None:
        """Once connected to the broker: announce the stale leaves, renew, watch the others."""
        loop = asyncio.get_running_loop()
        stale, self._stale = self._stale, []
        self._tasks = [
            loop.create_task(self.announce(stale), name="presence-stale"),
            loop.create_task(self.lease.run(), name="lease"),
            loop.create_task(self._expire_forever(), name="presence-expiry"),
        ]

    async def stop(self, *, drop: bool) -> None:
        for task in self._tasks:
            task.cancel()
        if drop:
            try:
                # In a thread of its own: at shutdown the main sync thread may be held by a
                # request waiting on this loop, and a thread-sensitive call would deadlock.
                changes = await sync_to_async(
                    _in_own_connection(service.drop_instance), thread_sensitive=False
                )(self.instance_id)
                await self.announce(changes)
            except Exception as exc:
                logger.warning("could not remove this instance's presence: %s", exc)

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_SECONDS * random.uniform(0.75, 1.25))
            try:
                expired, changes = await database_sync_to_async(service.expire_leases)()
            except Exception as exc:
                logger.warning("could not look for lapsed leases: %s", exc)
                continue
            if expired:
                metrics.lease_expiries.inc(len(expired))
                logger.warning("instances %s stopped renewing their leases: their presence removed", expired)
            await self.announce(changes)


def _in_own_connection(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, closing the thread's database connection after it (a thread of its own)."""

    def run(*args: Any) -> Any:
        try:
            return function(*args)
        finally:
            connection.close()

    return run
