"""The HTTP API (CONTRACT §3): thin views over the services."""

import logging
import time
from typing import cast

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.models import User
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.generics import RetrieveAPIView
from rest_framework.permissions import DjangoModelPermissions, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors
from notifications.api.errors import PayloadTooLarge
from notifications.api.flows import PublishBatch, PublishOne
from notifications.api.serializers import (
    BatchPublishSerializer,
    BatchRecordsSerializer,
    HistoryQuerySerializer,
    HistorySerializer,
    InboundFrameSerializer,
    MessageSerializer,
    PublishSerializer,
    TicketSerializer,
)
from notifications.models import Message
from notifications.services import streams
from notifications.tickets import issue_ticket

logger = logging.getLogger(__name__)

# How long a publisher's permission is remembered (seconds).
PERMISSION_CACHE_SECONDS = 10.0
# Room for the envelope around a payload of the largest allowed size.
REQUEST_OVERHEAD_BYTES = 16 * 1024
# A batch request's body at most (413 beyond): 1000 messages of up to ~8 KiB each. Larger
# payloads (up to RT_MAX_PAYLOAD_BYTES each) travel in smaller batches.
BATCH_MAX_BYTES = 8 * 1024 * 1024


class CanPublish(DjangoModelPermissions):
    """`notifications.add_message` is what lets a user publish.

    The answer is remembered per user for PERMISSION_CACHE_SECONDS in this process: publishers
    post in bursts, and Django would otherwise query the user's and groups' permissions on
    every request. A revoked permission therefore takes effect within that time.
    """

    perms_map = {"POST": ["%(app_label)s.add_%(model_name)s"]}
    _answers: dict[tuple, tuple[float, bool]] = {}

    def has_permission(self, request, view):
        user = request.user
        if not user or not user.is_authenticated:
            return False
        now = time.monotonic()
        key = (user.pk, user.date_joined)
        cached = self._answers.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        allowed = super().has_permission(request, view)
        if len(self._answers) > 10_000:
            self._answers.clear()
        self._answers[key] = (now + PERMISSION_CACHE_SECONDS, allowed)
        return allowed


IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description="Makes retries safe for 24 hours: the same key and body answer with the same message(s).",
)


class MessageCreateView(APIView):
    """`POST /api/v1/messages/`. Requests with a token are served by `fast_publish` in front of
    Django where the ASGI module installs it; this view serves the rest (sessions, errors it
    leaves to DRF) with the same steps (`flows.PublishOne`) and answers."""

    permission_classes = [IsAuthenticated, CanPublish]
    queryset = Message.objects.none()

    @extend_schema(
        request=PublishSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: MessageSerializer,
            400: OpenApiResponse(description="Bad input (field errors)"),
            404: OpenApiResponse(description="The message published with this Idempotency-Key was deleted"),
            409: OpenApiResponse(description="A request with this Idempotency-Key is still in flight"),
            413: OpenApiResponse(description="Payload larger than RT_MAX_PAYLOAD_BYTES"),
            422: OpenApiResponse(description="Idempotency-Key reused with a different body"),
            503: OpenApiResponse(description="Broker unavailable; nothing was published"),
        },
        summary="Publish a message to the sockets of a topic, a user, or everyone",
    )
    def post(self, request):
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        if length > max_single_request_bytes():
            raise PayloadTooLarge(
                f"The request body is larger than {settings.RT_MAX_PAYLOAD_BYTES} bytes allow."
            )
        flow = PublishOne(request.user, request.data, request.headers.get("Idempotency-Key"))
        flow.accept()
        if flow.stored():
            async_to_sync(flow.publish)()
        return Response(flow.finish(), status=status.HTTP_202_ACCEPTED)


class MessageBatchView(APIView):
    """`POST /api/v1/messages/batch/`: up to 1000 messages, all or nothing (`flows.PublishBatch`)."""

    permission_classes = [IsAuthenticated, CanPublish]
    queryset = Message.objects.none()

    @extend_schema(
        request=BatchPublishSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: BatchRecordsSerializer,
            400: OpenApiResponse(
                description="Bad input: `messages` lists each item's field errors (`{}` for a valid one)"
            ),
            404: OpenApiResponse(description="The batch published with this Idempotency-Key was deleted"),
            409: OpenApiResponse(description="A request with this Idempotency-Key is still in flight"),
            413: OpenApiResponse(description=f"Request body larger than {BATCH_MAX_BYTES} bytes"),
            422: OpenApiResponse(description="Idempotency-Key reused with a different body"),
            503: OpenApiResponse(description="Broker unavailable; nothing was published"),
        },
        summary="Publish 1 to 1000 messages at once: all are accepted, or none",
    )
    def post(self, request):
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        if length > BATCH_MAX_BYTES:
            raise PayloadTooLarge(f"A batch request is limited to {BATCH_MAX_BYTES} bytes.")
        flow = PublishBatch(request.user, request.data, request.headers.get("Idempotency-Key"))
        flow.accept()
        if flow.stored():
            async_to_sync(flow.publish)()
        return Response(flow.finish(), status=status.HTTP_202_ACCEPTED)


def max_single_request_bytes() -> int:
    """The largest body `POST /api/v1/messages/` reads: a payload of the largest allowed size and
    room for the envelope around it."""
    return settings.RT_MAX_PAYLOAD_BYTES + REQUEST_OVERHEAD_BYTES


NOT_VISIBLE = OpenApiResponse(description="No such record, or not one you may read")


@extend_schema_view(get=extend_schema(responses={200: MessageSerializer, 404: NOT_VISIBLE}))
class MessageDetailView(RetrieveAPIView):
    serializer_class = MessageSerializer

    def get_queryset(self):
        return selectors.visible_messages(cast(User, self.request.user))  # IsAuthenticated


@extend_schema_view(get=extend_schema(responses={200: InboundFrameSerializer, 404: NOT_VISIBLE}))
class InboundDetailView(RetrieveAPIView):
    serializer_class = InboundFrameSerializer

    def get_queryset(self):
        return selectors.visible_inbound(cast(User, self.request.user))  # IsAuthenticated


class HistoryView(APIView):
    """A stream's kept messages (CONTRACT §3): a page loads its state here, then subscribes with `since`."""

    @extend_schema(
        parameters=[HistoryQuerySerializer],
        responses={
            200: HistorySerializer,
            400: OpenApiResponse(description="Bad query"),
            403: OpenApiResponse(),
        },
        summary="A topic's or your own stream's recent messages, oldest first",
    )
    def get(self, request):
        query = HistoryQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        user = cast(User, request.user)  # IsAuthenticated
        if "topic" in params:
            if not selectors.may_read_topic(user, params["topic"]):
                raise PermissionDenied("You may not read this topic.")
            stream = streams.topic_stream(params["topic"])
        else:
            stream = streams.user_stream(user.pk)
        seq, epoch, messages = streams.history(stream, params["since"], params["limit"])
        data = {"stream": streams.wire_name(stream), "epoch": epoch, "seq": seq, "messages": messages}
        return Response(HistorySerializer(data).data)


class TicketView(APIView):
    @extend_schema(
        request=None, responses={200: TicketSerializer}, summary="A short-lived ticket for `/ws/?ticket=`"
    )
    def post(self, request):
        data = {"ticket": issue_ticket(request.user), "expires_in": settings.RT_TICKET_TTL}
        return Response(TicketSerializer(data).data)
