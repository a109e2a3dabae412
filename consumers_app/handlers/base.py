"""The interface of an inbound handler, and the context it gets to reply with.

A handler runs in a worker, inside the database transaction that marks its frame processed:
what it writes and the replies it asks for commit together, or not at all. Replies are stored
as messages and published only after that commit (and again after a crash, if need be).
"""

from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import User

from notifications.models import InboundFrame, Message
from notifications.services.messages import new_message


class InvalidPayload(ValueError):
    """The payload is wrong for this event; the socket gets an `invalid` error, nothing is queued."""


class Forbidden(PermissionError):
    """The sender may not send this (say, to a topic it may not subscribe to): `forbidden`."""


class InboundHandler:
    """Subclass, set the event name in RT_INBOUND_HANDLERS, and implement `handle`."""

    #: False for a handler that writes nothing itself (only replies): it then runs without a
    #: savepoint of its own, which saves two round trips to the database per frame.
    writes_to_database: bool = True

    def validate(self, payload: Any) -> None:
        """Check the payload at the socket, before anything is queued. Raise InvalidPayload."""

    #: True for a handler whose `authorize` asks the database: the socket then calls it (in a
    #: thread) before queueing; False spares every other frame that thread hop.
    authorizes: bool = False

    def authorize(self, user: User, payload: Any) -> None:
        """Check at the socket that `user` may send this valid payload. Raise Forbidden."""

    def handle(self, frame: InboundFrame, context: "HandlerContext") -> None:
        raise NotImplementedError


@dataclass
class HandlerContext:
    """What a handler may do besides its own writes: send messages, published after commit."""

    frame: InboundFrame
    worker_id: str
    messages: list[Message] = field(default_factory=list)

    def reply(self, event: str, payload: Any) -> Message:
        """A message to every socket of the frame's sender."""
        return self._add(user_id=self.frame.user_id, event=event, payload=payload)

    def send_to_user(self, user_id: int, event: str, payload: Any) -> Message:
        return self._add(user_id=user_id, event=event, payload=payload)

    def send_to_topic(self, topic: str, event: str, payload: Any) -> Message:
        return self._add(topic=topic, event=event, payload=payload)

    def broadcast(self, event: str, payload: Any) -> Message:
        return self._add(broadcast=True, event=event, payload=payload)

    def _add(self, **target: Any) -> Message:
        # Stored with the frame's batch, in the same transaction, after the handler returns.
        message = new_message(source_inbound_id=self.frame.id, origin_instance=self.worker_id, **target)
        message.route_group = self.frame.instance  # where its sender's socket is, most likely
        self.messages.append(message)
        return message
