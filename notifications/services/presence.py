"""Presence (CONTRACT §4): who is subscribed to a topic on every instance, and instance leases.

The store is PostgreSQL (or whatever database the deployment has), because every instance and
the API must read the same answer and a dead instance's members must be removable by others:
- `PresenceMember`, per (topic, user, instance): that instance's socket count, so a dead
  instance's share can be taken away exactly;
- `PresenceTotal`, per (topic, user): the count across instances. Its row is locked by the
  transaction that changes it, so of two instances adding a user's first two sockets at once,
  one sees 0 → 1 (a `join`) and the other 1 → 2 (nothing): user-level joins and leaves, once.
Instances send their changes in batches (deltas per (topic, user), netted), so a socket that
subscribes and leaves within a batch costs nothing. `InstanceLease` rows say who is alive.
"""

import datetime
import logging
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from notifications.models import InstanceLease, PresenceMember, PresenceTotal

logger = logging.getLogger(__name__)

Key = tuple[str, int]  # (topic, user id)


@dataclass(frozen=True, slots=True)
class Change:
    """A user-level presence change: `join` (first socket) or `leave` (last one gone)."""

    kind: str
    topic: str
    user_id: int
    username: str
    version: int

    def body(self) -> dict[str, Any]:
        """As it travels on the broker to every instance."""
        return {"presence": self.kind, "topic": self.topic, "user": self.username, "version": self.version}


def apply(instance: str, deltas: dict[Key, int]) -> list[Change]:
    """Add an instance's socket count changes; the joins and leaves they make, cluster-wide."""
    deltas = {key: delta for key, delta in deltas.items() if delta}
    if not deltas:
        return []
    with transaction.atomic():
        return _apply(instance, deltas)


def _apply(instance: str, deltas: dict[Key, int]) -> list[Change]:
    changes: list[tuple[str, Key, int]] = []
    for key in sorted(deltas):  # rows locked in one order: no deadlock between instances
        topic, user_id = key
        delta = deltas[key]
        _add_member(instance, topic, user_id, delta)
        after, version = _add_total(topic, user_id, delta)
        before = after - delta
        if before <= 0 < after:
            changes.append(("join", key, version))
        elif after <= 0 < before:
            changes.append(("leave", key, version))
    return _named(changes)


def _add_member(instance: str, topic: str, user_id: int, delta: int) -> None:
    row, created = PresenceMember.objects.select_for_update().get_or_create(
        topic=topic, user_id=user_id, instance=instance, defaults={"connections": max(delta, 0)}
    )
    if created:
        return
    connections = max(row.connections + delta, 0)
    if connections:
        PresenceMember.objects.filter(pk=row.pk).update(connections=connections)
    else:
        row.delete()


def _add_total(topic: str, user_id: int, delta: int) -> tuple[int, int]:
    """The user's count on the topic after `delta`, and the row's new version."""
    table = PresenceTotal._meta.db_table
    users = get_user_model()._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (topic, user_id, username, connections, version) "
            f"SELECT %s, id, username, %s, 1 FROM {users} WHERE id = %s "
            f"ON CONFLICT (topic, user_id) DO UPDATE SET "
            f"connections = CASE WHEN {table}.connections + %s > 0 THEN {table}.connections + %s ELSE 0 END, "
            f"version = {table}.version + 1 RETURNING connections, version",
            [topic, max(delta, 0), user_id, delta, delta],
        )
        row = cursor.fetchone()
    return row if row is not None else (0, 0)  # a user deleted meanwhile counts for nothing


def _named(changes: list[tuple[str, Key, int]]) -> list[Change]:
    if not changes:
        return []
    ids = {user_id for _, (_, user_id), _ in changes}
    names = dict(get_user_model().objects.filter(pk__in=ids).values_list("pk", "username"))
    return [
        Change(kind, topic, user_id, names.get(user_id, ""), version)
        for kind, (topic, user_id), version in changes
    ]


def members(topic: str) -> list[tuple[str, int]]:
    """(username, sockets) of everyone subscribed to `topic` now, on every instance, by name."""
    return list(
        PresenceTotal.objects.filter(topic=topic, connections__gt=0)
        .order_by("username")
        .values_list("username", "connections")
    )


# --- instances ---------------------------------------------------------------------------------


def renew_lease(instance: str, kind: str, ttl: float, stats: dict[str, Any]) -> None:
    now = timezone.now()
    InstanceLease.objects.update_or_create(
        instance=instance,
        defaults={
            "kind": kind,
            "renewed_at": now,
            "expires_at": now + datetime.timedelta(seconds=ttl),
            "stats": stats,
        },
        create_defaults={
            "kind": kind,
            "started_at": now,
            "renewed_at": now,
            "expires_at": now + datetime.timedelta(seconds=ttl),
            "stats": stats,
        },
    )


def end_lease(instance: str) -> None:
    """A process that stops on purpose is gone at once, not after its lease lapses."""
    InstanceLease.objects.filter(instance=instance).delete()


def drop_instance(instance: str) -> list[Change]:
    """Take away everything an instance counted (it drained, died, or starts again): its leaves."""
    with transaction.atomic():
        rows = list(
            PresenceMember.objects.select_for_update()
            .filter(instance=instance)
            .values_list("topic", "user_id", "connections")
        )
        changes = _apply(instance, {(topic, user_id): -count for topic, user_id, count in rows})
        PresenceMember.objects.filter(instance=instance).delete()
        InstanceLease.objects.filter(instance=instance).delete()
    return changes


def expire_leases() -> tuple[list[str], list[Change]]:
    """Drop the web instances whose lease lapsed; the instances and the leaves that makes.

    Each lapsed lease is taken by one live instance alone (SKIP LOCKED), so its leaves go out
    once. Workers' leases just go.
    """
    now = timezone.now()
    expired: list[str] = []
    changes: list[Change] = []
    with transaction.atomic():
        lapsed = InstanceLease.objects.select_for_update(skip_locked=True).filter(expires_at__lt=now)
        for lease in lapsed:
            expired.append(lease.instance)
            if lease.kind == InstanceLease.Kind.WEB:
                changes += drop_instance(lease.instance)
            else:
                lease.delete()
    return expired, changes


def live_instances() -> list[InstanceLease]:
    return list(InstanceLease.objects.filter(expires_at__gte=timezone.now()).order_by("kind", "instance"))
