"""Reads: who may see which record."""

from django.contrib.auth.models import User
from django.db.models import Prefetch, QuerySet

from notifications.models import Delivery, InboundFrame, Message
from notifications.services.topics import can_subscribe


def visible_messages(user: User) -> QuerySet[Message]:
    """Publishers see their own messages; staff see all."""
    messages = Message.objects.select_related("user").prefetch_related(
        Prefetch("deliveries", queryset=Delivery.objects.select_related("user").order_by("delivered_at"))
    )
    return messages if user.is_staff else messages.filter(publisher=user)


def visible_inbound(user: User) -> QuerySet[InboundFrame]:
    """The sender and staff may read an inbound frame."""
    frames = InboundFrame.objects.select_related("user")
    return frames if user.is_staff else frames.filter(user=user)


def may_read_topic(user: User, topic: str) -> bool:
    """A topic's history and presence: whoever may subscribe to it, and publishers and staff."""
    return user.is_staff or user.has_perm("notifications.add_message") or can_subscribe(user, topic)
