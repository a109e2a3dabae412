"""Streams (CONTRACT §4): numbering messages in the transaction that accepts them, reading them back.

Every message belongs to one stream: `topic:T`, `user:ID` (on the wire just `user`, the
recipient's own) or `broadcast`. Its `seq` comes from the stream's row, advanced and locked by
the accepting transaction until it commits: commit order is seq order, so whoever reads seq N
can read every seq before it (a plain sequence could commit out of order, and readers skip).
The history is the message records themselves, read through the (stream, seq) index; what is
recoverable is bounded by RT_HISTORY_SIZE and RT_HISTORY_TTL, independently of how long the
admin keeps records.
"""

import datetime
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import QuerySet
from django.utils import timezone

from notifications.models import Message, Stream
from notifications.services import pg_arrays

BROADCAST = "broadcast"
USER_PREFIX = "user:"
TOPIC_PREFIX = "topic:"


def stream_of(message: Message) -> str:
    if message.broadcast:
        return BROADCAST
    if message.topic:
        return TOPIC_PREFIX + message.topic
    return f"{USER_PREFIX}{message.user_id}"


def legacy_stream(body: dict[str, Any]) -> str:
    """The stream of a broker message that carries no `stream` (published before streams)."""
    if body.get("broadcast"):
        return BROADCAST
    if body.get("topic"):
        return TOPIC_PREFIX + str(body["topic"])
    return f"{USER_PREFIX}{body.get('user_id')}"


def user_stream(user_id: int) -> str:
    return f"{USER_PREFIX}{user_id}"


def topic_stream(topic: str) -> str:
    return TOPIC_PREFIX + topic


def wire_name(stream: str) -> str:
    """A stream's name in frames: a user's stream is `user` to its own sockets."""
    return "user" if stream.startswith(USER_PREFIX) else stream


def new_epoch() -> str:
    return secrets.token_hex(4)


def number(messages: list[Message]) -> None:
    """Give each message its stream and the stream's next seqs, in list order.

    Call inside the transaction that stores them: the stream rows stay locked until it commits.
    One statement for all the streams, which are locked in name order (no deadlock between two
    transactions numbering the same streams).
    """
    numbering = Numbering(messages)
    if connection.vendor == "postgresql":
        sql, params = numbering.statement()
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            numbering.apply(cursor.fetchall())
    else:
        numbering.apply(_advance_elsewhere(numbering.counts()))


class Numbering:
    """The numbering of some messages, as one statement to send (`statement`, PostgreSQL) and
    what to do with its rows (`apply`): a caller may send it with other statements, in one
    round trip (`messages.store_messages`)."""

    def __init__(self, messages: list[Message]) -> None:
        self.groups: dict[str, list[Message]] = {}
        for message in messages:
            message.stream = stream_of(message)
            self.groups.setdefault(message.stream, []).append(message)
        self.names = sorted(self.groups)

    def counts(self) -> list[tuple[str, int]]:
        return [(name, len(self.groups[name])) for name in self.names]

    def statement(self) -> tuple[str, list[str]]:
        """ADVANCE_SQL and its parameters: add each stream's count to its last seq (creating it
        at 0); it returns each stream's new last seq and epoch."""
        return ADVANCE_SQL, [
            pg_arrays.literal(self.names),
            pg_arrays.literal(len(self.groups[name]) for name in self.names),
        ]

    def apply(self, rows: Iterable[tuple[str, int, str]]) -> None:
        """Number the messages from the statement's rows (name, new last seq, epoch)."""
        last = {name: (last_seq, epoch) for name, last_seq, epoch in rows}
        for name in self.names:
            group = self.groups[name]
            top, epoch = last[name]
            first = top - len(group) + 1
            for offset, message in enumerate(group):
                message.seq = first + offset
                message.epoch = epoch  # not a column: the stream's row holds it


# One text for any number of streams (psycopg caches a query's parsing by its text; a VALUES
# list of N rows is a new text, and 3N parameters to quote, for every N). A new stream's epoch is
# drawn by the database: most streams exist already, and an epoch drawn per stream per publish
# in Python (a system call each) was thrown away.
ADVANCE_SQL = (
    "INSERT INTO notifications_stream (name, epoch, last_seq) "
    "SELECT name, substr(md5(gen_random_uuid()::text), 1, 8), added "
    "FROM unnest(%s::text[], %s::bigint[]) AS t(name, added) "
    "ORDER BY name "
    "ON CONFLICT (name) DO UPDATE SET last_seq = notifications_stream.last_seq + excluded.last_seq "
    "RETURNING name, last_seq, epoch"
)


def _advance_elsewhere(counts: list[tuple[str, int]]) -> list[tuple[str, int, str]]:
    """ADVANCE_SQL's work on databases other than PostgreSQL (SQLite, for development)."""
    rows = ", ".join(["(%s, %s, %s)"] * len(counts))
    params: list[Any] = []
    for name, count in counts:
        params += [name, new_epoch(), count]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO notifications_stream (name, epoch, last_seq) VALUES {rows} "
            "ON CONFLICT (name) DO UPDATE SET last_seq = notifications_stream.last_seq + excluded.last_seq "
            "RETURNING name, last_seq, epoch",
            params,
        )
        return cursor.fetchall()


def give_back(message: Message) -> None:
    """Return a message's seq to its stream: the broker never took it (nothing was sent), and a
    seq must not be left as a hole. Only the stream's last seqs can be given back; so are the
    failed messages just below it, given up by publishers that failed before this one.

    A message the broker may have taken keeps its seq (a gap filled from the database may
    deliver it), since a later message with the same seq would be dropped as a copy.
    """
    with transaction.atomic():
        stream = Stream.objects.select_for_update().filter(name=message.stream).first()
        if stream is None or stream.last_seq != message.seq:
            return
        Message.objects.filter(id=message.id).update(seq=None)
        stream.last_seq -= 1
        while stream.last_seq > 0:
            below = Message.objects.filter(
                stream=stream.name,
                seq=stream.last_seq,
                status=Message.Status.FAILED,
                error__startswith=GIVEN_UP,
            ).first()
            if below is None:
                break
            Message.objects.filter(id=below.id).update(seq=None)
            stream.last_seq -= 1
        stream.save(update_fields=["last_seq"])
    message.seq = None


# How the error of a failed message that never reached the broker begins (its seq may be given back).
GIVEN_UP = "not sent: "


def positions(names: Iterable[str]) -> dict[str, tuple[int, str]]:
    """Each stream's last seq and epoch, creating the streams that have none yet (so an epoch is
    fixed from the first time anyone asks)."""
    wanted = sorted(set(names))
    found = {row.name: (row.last_seq, row.epoch) for row in Stream.objects.filter(name__in=wanted)}
    missing = [name for name in wanted if name not in found]
    if missing:
        Stream.objects.bulk_create(
            [Stream(name=name, epoch=new_epoch(), last_seq=0) for name in missing], ignore_conflicts=True
        )
        found |= {row.name: (row.last_seq, row.epoch) for row in Stream.objects.filter(name__in=missing)}
    return found


def with_epochs(messages: list[Message]) -> list[Message]:
    """Set `epoch` on messages read back from the database (it lives on the stream's row)."""
    named = {message.stream for message in messages if message.stream}
    epochs = dict(Stream.objects.filter(name__in=named).values_list("name", "epoch")) if named else {}
    for message in messages:
        message.epoch = epochs.get(message.stream)
    return messages


@dataclass
class Recovery:
    """What a socket resuming `stream` after `since` gets: the answer's `seq` and `epoch`, whether
    every missed message is still kept, and (if so) those messages, oldest first."""

    stream: str
    seq: int
    epoch: str
    recovered: bool
    messages: list[dict[str, Any]] = field(default_factory=list)


def recover_many(
    requests: Iterable[tuple[str, int | None, str | None]],
) -> dict[tuple[str, int | None, str | None], Recovery]:
    """Answer many (stream, since seq, since epoch) at once: one read of the stream rows and one
    read of messages per stream, from the oldest `since` asked of it (a reconnect storm of many
    sockets on one stream costs two queries, not two per socket). `since` None: the position only."""
    requests = list(set(requests))
    with transaction.atomic():
        known = positions(stream for stream, _, _ in requests)
        oldest: dict[str, int] = {}
        for stream, since, epoch in requests:
            last, current_epoch = known[stream]
            if since is not None and epoch == current_epoch and since < last:
                oldest[stream] = min(since, oldest.get(stream, since))
        kept = {
            stream: _kept_after(stream, since, known[stream][0], known[stream][1])
            for stream, since in oldest.items()
        }
    answers = {}
    for request in requests:
        stream, since, epoch = request
        last, current_epoch = known[stream]
        answers[request] = _answer(stream, since, epoch, last, current_epoch, kept.get(stream, []))
    return answers


def _answer(
    stream: str,
    since: int | None,
    epoch: str | None,
    last: int,
    current_epoch: str,
    kept: list[dict[str, Any]],
) -> Recovery:
    if since is None:
        return Recovery(stream, last, current_epoch, recovered=False)
    if epoch != current_epoch or since > last or since < 0:
        return Recovery(stream, last, current_epoch, recovered=False)
    missed = [body for body in kept if body["seq"] > since]
    complete = len(missed) == last - since and (not missed or missed[0]["seq"] == since + 1)
    if not complete:
        return Recovery(stream, last, current_epoch, recovered=False)
    return Recovery(stream, last, current_epoch, recovered=True, messages=missed)


def _kept(stream: str, since: int, last: int) -> QuerySet[Message]:
    """The messages of `stream` after `since` up to `last` that recovery and the history still
    keep (the last RT_HISTORY_SIZE, younger than RT_HISTORY_TTL), oldest first."""
    floor = max(since, last - settings.RT_HISTORY_SIZE)
    return Message.objects.filter(
        stream=stream, seq__gt=floor, seq__lte=last, created_at__gte=_ttl_cutoff()
    ).order_by("seq")


def _kept_after(stream: str, since: int, last: int, epoch: str) -> list[dict[str, Any]]:
    return _bodies(_kept(stream, since, last), epoch)


def _bodies(messages: Iterable[Message], epoch: str) -> list[dict[str, Any]]:
    """Messages read back, as the broker carries them, with their stream's epoch."""
    from notifications.services.messages import broker_body  # (it numbers through this module)

    bodies = []
    for message in messages:
        message.epoch = epoch
        bodies.append(broker_body(message))
    return bodies


def _ttl_cutoff() -> datetime.datetime:
    return timezone.now() - datetime.timedelta(seconds=settings.RT_HISTORY_TTL)


def history(stream: str, since: int, limit: int) -> tuple[int, str, list[Message]]:
    """The latest seq and epoch of `stream` and its kept messages after `since`, oldest first."""
    with transaction.atomic():
        last, epoch = positions([stream])[stream]
        messages = list(_kept(stream, since, last).select_related("user")[:limit])
    for message in messages:
        message.epoch = epoch
    return last, epoch, messages


def between(stream: str, after: int, before: int | None) -> tuple[str, int, list[dict[str, Any]]]:
    """To fill a gap: the stream's epoch and last seq, and its messages with after < seq < before
    (`before` None: all after), oldest first, at most RT_HISTORY_SIZE."""
    last, epoch = positions([stream])[stream]
    rows = Message.objects.filter(stream=stream, seq__gt=after, seq__lte=last)
    if before is not None:
        rows = rows.filter(seq__lt=before)
    return epoch, last, _bodies(rows.order_by("seq")[: settings.RT_HISTORY_SIZE], epoch)
