"""The baseline's HTTP side: publish to a topic with one group_send, and a readiness probe."""

import json
import uuid

from channels.layers import get_channel_layer
from django.http import HttpRequest, JsonResponse

from bench.baseline.consumers import TOPIC_NAME, group_name, now_iso


async def publish(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"detail": "POST only"}, status=405)
    try:
        body = json.loads(request.body)
    except ValueError:
        return JsonResponse({"detail": "not JSON"}, status=400)
    topic = body.get("topic") if isinstance(body, dict) else None
    if not isinstance(topic, str) or not TOPIC_NAME.match(topic):
        return JsonResponse({"topic": ["a topic name is required"]}, status=400)
    message = {
        "type": "message",
        "id": str(uuid.uuid4()),
        "topic": topic,
        "event": body.get("event") or "",
        "payload": body.get("payload"),
        "published_at": now_iso(),
    }
    await get_channel_layer().group_send(group_name(topic), {"type": "topic.message", "message": message})
    return JsonResponse({**message, "status": "published"}, status=202)


async def readyz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ready": True})
