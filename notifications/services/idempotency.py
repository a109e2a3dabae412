"""`Idempotency-Key` for publishing: a retry answers with the first request's message."""

import datetime
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from notifications.models import IdempotencyKey, Message

# How long a key is remembered, and how long a request may stay "in flight" before its key is
# taken as abandoned (its process died between storing the key and answering).
KEY_LIFETIME = datetime.timedelta(hours=24)
IN_FLIGHT_LIMIT = datetime.timedelta(seconds=60)
MAX_KEY_LENGTH = 255


class KeyInFlight(Exception):
    """Another request with this key has not finished yet (409)."""


class KeyReused(Exception):
    """This key was used with a different body (422)."""


class KeyMessageDeleted(Exception):
    """The message published with this key was deleted since (404): publish nothing again."""


@dataclass
class Claim:
    """A claimed key: either ours to use (`record`), or a finished replay (`replay`)."""

    record: IdempotencyKey | None = None
    replay: Message | None = None


def request_hash(body: Any) -> str:
    """Hash of the body as a JSON value: key order and whitespace do not matter."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def claim(user: User, key: str, body: Any) -> Claim:
    digest = request_hash(body)
    now = timezone.now()
    for _ in range(3):
        try:
            with transaction.atomic():
                return Claim(record=IdempotencyKey.objects.create(user=user, key=key, request_hash=digest))
        except IntegrityError:
            existing = IdempotencyKey.objects.filter(user=user, key=key).select_related("message").first()
            if existing is None:
                continue  # released meanwhile: try again
            expired = existing.created_at < now - KEY_LIFETIME
            in_flight = existing.completed_at is None
            abandoned = in_flight and existing.created_at < now - IN_FLIGHT_LIMIT
            if expired:
                IdempotencyKey.objects.filter(pk=existing.pk, created_at=existing.created_at).delete()
                continue
            if (
                abandoned
                and existing.message is not None
                and existing.message.status != Message.Status.FAILED
            ):
                # Its process died after the message was stored: the broker may have it, and
                # the sweeper publishes it if not. Publishing again would make two.
                complete(existing, existing.message)
                in_flight = False
            elif abandoned:
                IdempotencyKey.objects.filter(pk=existing.pk, created_at=existing.created_at).delete()
                continue
            if existing.request_hash != digest:
                raise KeyReused() from None
            if in_flight:
                raise KeyInFlight() from None
            if existing.message is None:
                raise KeyMessageDeleted() from None
            return Claim(replay=existing.message)
    raise KeyInFlight()


def attach(record: IdempotencyKey, message: Message) -> None:
    """Tie the key to its message in the transaction that stores the message (still in flight)."""
    IdempotencyKey.objects.filter(pk=record.pk).update(message=message)


def complete(record: IdempotencyKey, message: Message) -> None:
    IdempotencyKey.objects.filter(pk=record.pk).update(message=message, completed_at=timezone.now())


def release(record: IdempotencyKey) -> None:
    """Forget a key whose request was not accepted (nothing reached the broker), so the client
    may retry with it."""
    IdempotencyKey.objects.filter(pk=record.pk, completed_at__isnull=True).delete()


def complete_many(records: list[IdempotencyKey]) -> None:
    """`complete` for keys already attached to their messages (one update)."""
    if records:
        IdempotencyKey.objects.filter(pk__in=[r.pk for r in records]).update(completed_at=timezone.now())


def release_many(records: list[IdempotencyKey]) -> None:
    """`release` for many keys (one delete)."""
    if records:
        IdempotencyKey.objects.filter(pk__in=[r.pk for r in records], completed_at__isnull=True).delete()
