"""The baseline's consumers, written the way the Channels tutorial does it.

Sockets join a group per topic (`group_add`); a publish is one `group_send`; every consumer
encodes the frame itself. Inbound `send` frames go to a worker channel with
`channel_layer.send`, and the worker (`runworker`) answers the sender's channel directly.
"""

import json
import os
import re
import uuid

from channels.consumer import AsyncConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

ECHO_CHANNEL = "bench-echo"
TOPIC_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")


def group_name(topic: str) -> str:
    return f"topic.{topic}"


def now_iso() -> str:
    return timezone.now().isoformat().replace("+00:00", "Z")


class TopicConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.topics: set[str] = set()
        await self.accept()
        await self.send_json(
            {"type": "welcome", "connection": self.channel_name, "instance": settings.INSTANCE_ID}
        )

    async def disconnect(self, code: int) -> None:
        for topic in getattr(self, "topics", ()):
            await self.channel_layer.group_discard(group_name(topic), self.channel_name)

    async def send_json(self, frame: dict) -> None:
        await self.send(text_data=json.dumps(frame))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            frame = json.loads(text_data or "")
        except ValueError:
            await self.send_json({"type": "error", "code": "bad_json", "detail": "not JSON"})
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "subscribe" and TOPIC_NAME.match(str(frame.get("topic", ""))):
            await self.channel_layer.group_add(group_name(frame["topic"]), self.channel_name)
            self.topics.add(frame["topic"])
            await self.send_json({"type": "subscribed", "topic": frame["topic"]})
        elif kind == "send" and isinstance(frame.get("event"), str):
            inbound_id = str(uuid.uuid4())
            await self.channel_layer.send(
                ECHO_CHANNEL,
                {
                    "type": "echo.request",
                    "id": inbound_id,
                    "reply_to": self.channel_name,
                    "payload": frame.get("payload"),
                },
            )
            await self.send_json({"type": "receipt", "ref": frame.get("ref"), "id": inbound_id})
        elif kind == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self.send_json(
                {"type": "error", "code": "unknown_type", "detail": "unknown or invalid frame"}
            )

    async def topic_message(self, event: dict) -> None:
        await self.send_json(event["message"])

    async def echo_reply(self, event: dict) -> None:
        await self.send_json(event["message"])


class EchoWorker(AsyncConsumer):
    """Runs in `runworker` processes: competing consumers of the `bench-echo` channel."""

    worker_id = os.environ.get("BASELINE_INSTANCE_ID", f"worker-{os.getpid()}")

    async def echo_request(self, message: dict) -> None:
        await self.channel_layer.send(
            message["reply_to"],
            {
                "type": "echo.reply",
                "message": {
                    "type": "message",
                    "id": str(uuid.uuid4()),
                    "topic": None,
                    "event": "echo",
                    "payload": {
                        "inbound": message["id"],
                        "data": message["payload"],
                        "worker": self.worker_id,
                    },
                    "published_at": now_iso(),
                },
            },
        )
