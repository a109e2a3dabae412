"""The baseline's HTTP side: publish to a topic with one group_send, and a readiness probe.

Two publish views at two paths, both with no authentication and no database:

- `publish` (`/api/v1/messages/`): a bare async Django view (parse, check the topic, one
  `group_send`, 202). Fan-out, inbound and the publish benchmarks have always used it.
- `DrfPublish` (`/drf/api/v1/messages/`): what a DRF tutorial builds: a sync `APIView`, a
  serializer, `async_to_sync(group_send)`. For comparing the project with a plain DRF view.
"""

import json
import uuid

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.http import HttpRequest, JsonResponse
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

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


class PublishSerializer(serializers.Serializer):
    topic = serializers.RegexField(TOPIC_NAME)
    event = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)
    payload = serializers.JSONField(required=False, allow_null=True, default=None)


class DrfPublish(APIView):
    authentication_classes: list = []
    permission_classes: list = []

    def post(self, request):
        serializer = PublishSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        message = {
            "type": "message",
            "id": str(uuid.uuid4()),
            "topic": data["topic"],
            "event": data["event"],
            "payload": data["payload"],
            "published_at": now_iso(),
        }
        async_to_sync(get_channel_layer().group_send)(
            group_name(data["topic"]), {"type": "topic.message", "message": message}
        )
        return Response({**message, "status": "published"}, status=202)


async def readyz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ready": True})
