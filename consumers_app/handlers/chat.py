"""Example handler to copy: a chat line is stored and rebroadcast to its room's topic.

Payload: {"room": "lobby", "text": "hello"}. Subscribers of topic `chat.<room>` receive
{"event": "chat.message", "payload": {"room", "text", "author", "inbound"}}.
"""

from typing import Any

from django.contrib.auth.models import User

from consumers_app.handlers.base import Forbidden, HandlerContext, InboundHandler, InvalidPayload
from consumers_app.models import ChatMessage
from notifications.models import InboundFrame
from notifications.services.topics import TOPIC_RULE, can_subscribe, is_valid_topic_name

MAX_TEXT = 2000


class ChatMessageHandler(InboundHandler):
    def validate(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            raise InvalidPayload('payload must be an object: {"room": ..., "text": ...}')
        room, text = payload.get("room"), payload.get("text")
        if not is_valid_topic_name(f"chat.{room}") or not isinstance(room, str):
            raise InvalidPayload(f"room: {TOPIC_RULE}")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise InvalidPayload(f"text: a non-empty string of at most {MAX_TEXT} characters")

    authorizes = True

    def authorize(self, user: User, payload: Any) -> None:
        """A room's topic may be restricted to groups (an admin's Topic): its non-members may not post."""
        topic = f"chat.{payload['room']}"
        if not can_subscribe(user, topic):
            raise Forbidden(f"you may not post to {topic!r}")

    def handle(self, frame: InboundFrame, context: HandlerContext) -> None:
        self.validate(frame.payload)
        assert frame.payload is not None  # validate() accepted it: an object
        room, text = frame.payload["room"], frame.payload["text"]
        # One row per frame (unique on `inbound`): a retried frame cannot post twice.
        ChatMessage.objects.get_or_create(
            inbound=frame, defaults={"room": room, "author_id": frame.user_id, "text": text}
        )
        author = frame.user.get_username() if frame.user is not None else None
        context.send_to_topic(
            f"chat.{room}",
            "chat.message",
            {"room": room, "text": text, "author": author, "inbound": str(frame.id)},
        )
