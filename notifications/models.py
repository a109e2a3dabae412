"""The records: messages and their streams, deliveries, inbound frames, topic restrictions,
idempotency keys, presence and instance leases (Django's one models module per app)."""

import uuid
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ObjectDoesNotExist
from django.db import models

# Longest error text kept on a record: enough for an exception's message, bounded for the admin.
ERROR_MAX_CHARS = 2000


def clip_error(text: str) -> str:
    """An error text as a record keeps it."""
    return text[:ERROR_MAX_CHARS]


# Unchecked links (`db_constraint=False`): the links of the hottest rows (a message's users and
# frame, a delivery's message and user) are not checked by the database. A checked link costs
# every insert a locking lookup at commit: about a tenth of the batch publishes' throughput and
# 7% of the inbound echoes'. Django still applies their `on_delete` when a user or message is
# deleted through it; only a user deleted while a message to, from or delivered to them is being
# stored can leave a link to nothing, which reads as no user (`linked`).


def linked(record: models.Model, field: str) -> Any:
    """The record's related row, or None when there is none or it is gone (unchecked links)."""
    try:
        return getattr(record, field)
    except ObjectDoesNotExist:
        return None


class Message(models.Model):
    """A message published to sockets, whoever published it (API or worker)."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted", "accepted (stored, not yet confirmed by the broker)"
        PUBLISHED = "published", "published (confirmed by the broker)"
        FAILED = "failed", "failed (never reached the broker)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Not indexed: messages are read by stream (`one_message_per_stream_seq`), and every index is
    # paid on each insert and on the `published` update.
    topic = models.CharField(max_length=200, blank=True, null=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="received_messages",
        db_constraint=False,  # unchecked link (above)
        help_text="Addressee of a user message.",
    )
    broadcast = models.BooleanField(default=False)
    event = models.CharField(max_length=100, blank=True, default="")
    payload = models.JSONField(null=True, blank=True)
    # Not indexed: recording a confirm then changes no indexed column, so PostgreSQL rewrites the
    # row in place (a HOT update) instead of adding an entry to each of its indexes. The sweeper
    # finds unconfirmed messages through `PendingConfirm` instead.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACCEPTED)
    publisher = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="published_messages",
        db_constraint=False,  # unchecked link (above)
    )
    origin_instance = models.CharField(max_length=200, blank=True, default="")
    source_inbound = models.ForeignKey(
        "InboundFrame",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="replies",
        db_constraint=False,  # unchecked link (above)
        help_text="The inbound frame whose handler produced this message.",
    )
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    published_at = models.DateTimeField(null=True, blank=True)
    stream = models.CharField(
        max_length=210, blank=True, default="", help_text="topic:T, user:ID or broadcast (CONTRACT §4)."
    )
    seq = models.BigIntegerField(null=True, blank=True, help_text="Its number in its stream: 1, 2, 3, ...")
    #: The stream's epoch, on records numbered or read back here (not a column: the stream's row holds it).
    epoch: str | None = None
    #: Replies of frames that came through one web instance travel together (not a column).
    route_group: str = ""
    #: The `PendingConfirm` row written with this message, on records stored here (not a column).
    pending: "PendingConfirmTicket | None" = None

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Serves recovery and the history (stream, seq > N) and keeps a number from being given twice.
            models.UniqueConstraint(fields=["stream", "seq"], name="one_message_per_stream_seq")
        ]

    def __str__(self) -> str:
        return f"{self.target_label} {self.event or '-'} ({self.id})"

    @property
    def target_label(self) -> str:
        if self.broadcast:
            return "broadcast"
        if self.topic:
            return f"topic:{self.topic}"
        return f"user:{self.user_id}"


class PendingConfirm(models.Model):
    """Messages stored together (they share one `created_at`) whose broker confirm is not yet recorded.

    The sweeper's list: a row is written in the transaction that stores its messages and deleted
    with the record of their confirm (or by the sweeper, once none of them is `accepted`). So
    the sweeper needs no index on Message.status, and recording a confirm rewrites a message
    in place (README, "Decisions": the confirm's record is a HOT update).
    """

    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"messages stored at {self.created_at.isoformat()}"


class PendingConfirmTicket:
    """What the messages of one store know of their `PendingConfirm` row (not a model): its id
    and how many they are, so recording all of them confirmed deletes it."""

    __slots__ = ("id", "size")

    def __init__(self, row_id: int, size: int) -> None:
        self.id = row_id
        self.size = size


class Stream(models.Model):
    """A stream's numbering: the last `seq` given and its `epoch` (CONTRACT §4 "Streams and recovery").

    The row is locked by the transaction that numbers a message and held to its commit, so
    commit order is seq order: a reader that sees seq N has seen every seq before it.
    """

    name = models.CharField(max_length=210, primary_key=True)
    epoch = models.CharField(max_length=16)
    last_seq = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name} @ {self.last_seq} ({self.epoch})"


class Delivery(models.Model):
    """One message handed to one socket on one web instance."""

    # Both found through `one_delivery_per_socket` (message, connection): no index of their own.
    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, related_name="deliveries", db_index=False, db_constraint=False
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    connection = models.CharField(max_length=64)
    instance = models.CharField(max_length=200, db_index=True)
    delivered_at = models.DateTimeField(db_index=True)
    acked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-delivered_at"]
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(fields=["message", "connection"], name="one_delivery_per_socket")
        ]

    def __str__(self) -> str:
        return f"{self.message_id} -> {self.connection}@{self.instance}"


class Topic(models.Model):
    """An admin's restriction on a topic: with groups, only their members and staff may subscribe."""

    name = models.CharField(max_length=200, unique=True)
    description = models.CharField(max_length=300, blank=True, default="")
    groups = models.ManyToManyField(
        Group,
        blank=True,
        help_text="When empty the topic is open to every signed-in user.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class InboundFrame(models.Model):
    """A frame a socket sent to the backend, and what the workers made of it."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted", "accepted (queued)"
        PROCESSED = "processed", "processed"
        FAILED = "failed", "failed (will be retried)"
        DEAD = "dead", "dead (will not be retried)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="inbound_frames"
    )
    ref = models.CharField(max_length=100, blank=True, default="")
    event = models.CharField(max_length=100, db_index=True)
    payload = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACCEPTED, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    connection = models.CharField(max_length=64, blank=True, default="")
    instance = models.CharField(max_length=200, blank=True, default="")
    processed_by = models.CharField(max_length=200, blank=True, default="")
    error = models.TextField(blank=True, default="")
    accepted_at = models.DateTimeField(auto_now_add=True, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-accepted_at"]

    def __str__(self) -> str:
        return f"{self.event} {self.id} ({self.status})"


class IdempotencyKey(models.Model):
    """An accepted publish request's key, so a retry answers with the same message.

    Deleting the message keeps the key (`message` becomes null, `completed_at` stays): a retry
    then learns that its message was deleted instead of publishing it a second time.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    request_hash = models.CharField(max_length=64)
    message = models.ForeignKey(Message, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    completed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the request was accepted (null while in flight)."
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="one_idempotency_key")]

    def __str__(self) -> str:
        return f"{self.user_id}:{self.key}"


class InstanceLease(models.Model):
    """A live process of the deployment (web instance or worker), renewed every few seconds.

    A web instance whose lease lapses (killed, cut off) is dead to the others: they remove its
    sockets' presence. Its last counters are what the admin's overview shows.
    """

    class Kind(models.TextChoices):
        WEB = "web", "web instance"
        WORKER = "worker", "worker"

    instance = models.CharField(max_length=200, primary_key=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    started_at = models.DateTimeField()
    renewed_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)
    stats = models.JSONField(default=dict, blank=True, help_text="Counters at the last renewal.")

    def __str__(self) -> str:
        return f"{self.kind} {self.instance}"


class PresenceMember(models.Model):
    """How many sockets of `user` on `instance` are subscribed to `topic` (CONTRACT §4 "Presence")."""

    topic = models.CharField(max_length=200)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    instance = models.CharField(max_length=200, db_index=True)
    connections = models.PositiveIntegerField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["topic", "user", "instance"], name="one_presence_row_per_instance"
            )
        ]


class PresenceTotal(models.Model):
    """A user's sockets on a topic across all instances: its row lock orders joins and leaves.

    `version` grows with every change, so an instance that hears two changes out of order keeps
    the later one.
    """

    topic = models.CharField(max_length=200)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    # Copied from the user, so a topic's members are read in name order from one index, with no
    # join and no sort (a presence answer at 10,000 members).
    username = models.CharField(max_length=150, default="")
    connections = models.PositiveIntegerField(default=0)
    version = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["topic", "user"], name="one_presence_total")]
        indexes = [
            models.Index(
                fields=["topic", "username"],
                condition=models.Q(connections__gt=0),
                name="presence_members_by_name",
            )
        ]
