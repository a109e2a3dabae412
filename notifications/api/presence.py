"""`GET /api/v1/presence/?topic=T` (CONTRACT §3): who is subscribed to a topic, on every instance."""

from typing import cast

from django.contrib.auth.models import User
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors
from notifications.api.serializers import TopicField
from notifications.services import presence


class PresenceQuerySerializer(serializers.Serializer):
    topic = TopicField()


class MemberSerializer(serializers.Serializer):
    user = serializers.CharField()
    connections = serializers.IntegerField()


class PresenceSerializer(serializers.Serializer):
    topic = serializers.CharField()
    users = MemberSerializer(many=True)


class PresenceView(APIView):
    @extend_schema(
        parameters=[PresenceQuerySerializer],
        responses={
            200: PresenceSerializer,
            400: OpenApiResponse(description="No topic, or not a topic name"),
            403: OpenApiResponse(description="You may not subscribe to this topic"),
        },
        summary="Who is subscribed to a topic now, on every instance",
    )
    def get(self, request):
        query = PresenceQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        topic = query.validated_data["topic"]
        if not selectors.may_read_topic(cast(User, request.user), topic):  # IsAuthenticated
            raise PermissionDenied("You may not see who is on this topic.")
        # Plain data, not the serializer's field-by-field pass: 10,000 members cost it ~30 ms.
        users = [{"user": user, "connections": count} for user, count in presence.members(topic)]
        return Response({"topic": topic, "users": users})
