"""The HTTP API (CONTRACT §3): thin views over the services."""

import logging
import time
from typing import cast

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.generics import RetrieveAPIView
from rest_framework.permissions import DjangoModelPermissions, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors
from notifications.api.errors import BrokerUnavailableError, Conflict, PayloadTooLarge, Unprocessable
from notifications.api.serializers import (
    HistoryQuerySerializer,
    HistorySerializer,
    InboundFrameSerializer,
    MessageSerializer,
    PublishSerializer,
    TicketSerializer,
    too_large,
)
from notifications.broker import BrokerUnavailable
from notifications.models import Delivery, Message
from notifications.services import idempotency, streams
from notifications.services.messages import create_message, publish_from_web
from notifications.tickets import issue_ticket

logger = logging.getLogger(__name__)

# How long a publisher's permission is remembered (seconds).
PERMISSION_CACHE_SECONDS = 10.0
# Room for the envelope around a payload of the largest allowed size.
REQUEST_OVERHEAD_BYTES = 16 * 1024
# A retry whose key's message was deleted publishes nothing and gets this 404.
MESSAGE_DELETED = "The message published with this Idempotency-Key was deleted."


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


class MessageCreateView(APIView):
    permission_classes = [IsAuthenticated, CanPublish]
    queryset = Message.objects.none()

    @extend_schema(
        request=PublishSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                description="Makes retries safe for 24 hours: the same key and body answer with the same message.",
            )
        ],
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
        if length > settings.RT_MAX_PAYLOAD_BYTES + REQUEST_OVERHEAD_BYTES:
            raise PayloadTooLarge(
                f"The request body is larger than {settings.RT_MAX_PAYLOAD_BYTES} bytes allow."
            )
        body = request.data
        serializer = PublishSerializer(data=body)
        if not serializer.is_valid():
            if too_large(serializer.errors):
                raise PayloadTooLarge(f"`payload` is larger than {settings.RT_MAX_PAYLOAD_BYTES} bytes.")
            raise ValidationError(serializer.errors)

        key = request.headers.get("Idempotency-Key")
        claim = None
        if key is not None:
            if not key or len(key) > idempotency.MAX_KEY_LENGTH:
                raise ValidationError({"Idempotency-Key": [f"1-{idempotency.MAX_KEY_LENGTH} characters."]})
            try:
                claim = idempotency.claim(request.user, key, body)
            except idempotency.KeyInFlight:
                raise Conflict("A request with this Idempotency-Key is still in flight.") from None
            except idempotency.KeyReused:
                raise Unprocessable("This Idempotency-Key was used with a different body.") from None
            except idempotency.KeyMessageDeleted:
                raise NotFound(MESSAGE_DELETED) from None
            if claim.replay is not None:
                replay = selectors.visible_messages(request.user).filter(pk=claim.replay.pk).first()
                if replay is None:  # deleted since the claim
                    raise NotFound(MESSAGE_DELETED)
                return self._accepted(replay)

        data = serializer.validated_data
        try:
            with transaction.atomic():
                message = create_message(
                    topic=data.get("topic"),
                    user=data.get("user"),
                    broadcast=bool(data.get("broadcast")),
                    event=data.get("event") or "",
                    payload=data.get("payload"),
                    publisher=request.user,
                    origin_instance=settings.RT_INSTANCE_ID,
                )
                if claim is not None and claim.record is not None:
                    # Committed with the message: from here on a retry can only find this one.
                    idempotency.attach(claim.record, message)
        except BaseException:
            if claim is not None and claim.record is not None:
                idempotency.release(claim.record)
            raise
        try:
            publish_from_web(message)
        except BrokerUnavailable:
            if claim is not None and claim.record is not None:
                idempotency.release(claim.record)
            raise BrokerUnavailableError() from None
        finally:
            # Whatever failed after the broker took it (recording the confirm, say), the key
            # stays with this message: a retry answers with it and publishes nothing.
            if claim is not None and claim.record is not None and message.status != Message.Status.FAILED:
                idempotency.complete(claim.record, message)
        # The record as accepted: its delivery log is written in batches, a moment later (GET it).
        message._prefetched_objects_cache = {"deliveries": Delivery.objects.none()}  # type: ignore[attr-defined]  # Django's private prefetch cache
        return self._accepted(message)

    def _accepted(self, message: Message) -> Response:
        return Response(MessageSerializer(message).data, status=status.HTTP_202_ACCEPTED)


class MessageDetailView(RetrieveAPIView):
    serializer_class = MessageSerializer

    def get_queryset(self):
        return selectors.visible_messages(cast(User, self.request.user))  # IsAuthenticated


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
