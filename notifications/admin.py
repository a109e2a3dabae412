"""Admin for the delivery log: read-only where editing would falsify it."""

from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db.models import Count, Q
from django.urls import reverse
from django.utils.html import format_html

from notifications.admin_overview import install as install_overview
from notifications.models import Delivery, InboundFrame, Message, Topic
from notifications.services.requeue import requeue_dead_frames


class ReadOnlyAdmin(admin.ModelAdmin):
    """The log records what happened: nobody adds or edits rows by hand."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class DeliveryInline(admin.TabularInline):
    model = Delivery
    readonly_fields = ("user", "connection", "instance", "delivered_at", "acked_at")
    fields = readonly_fields
    extra = 0
    can_delete = False
    show_change_link = True
    max_num = 0


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "target",
        "stream",
        "seq",
        "event",
        "status",
        "delivery_count",
        "acked_count",
        "publisher",
        "origin_instance",
        "created_at",
        "published_at",
    ]
    list_filter = ["status", "broadcast", "created_at", "event"]
    # `=stream` finds a stream's messages by its exact name: topic:T, user:ID or broadcast.
    search_fields = ["=id", "=stream", "topic", "user__username", "publisher__username", "event"]
    date_hierarchy = "created_at"
    inlines = [DeliveryInline]
    list_select_related = ["user", "publisher"]
    readonly_fields = [
        "id",
        "topic",
        "user",
        "broadcast",
        "event",
        "payload",
        "status",
        "publisher",
        "origin_instance",
        "source_inbound",
        "stream",
        "seq",
        "error",
        "created_at",
        "published_at",
    ]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                _deliveries=Count("deliveries"),
                _acked=Count("deliveries", filter=Q(deliveries__acked_at__isnull=False)),
            )
        )

    @admin.display(description="target")
    def target(self, obj):
        return obj.target_label if not obj.user_id else f"user:{obj.user}"

    @admin.display(description="deliveries", ordering="_deliveries")
    def delivery_count(self, obj):
        return obj._deliveries

    @admin.display(description="acked", ordering="_acked")
    def acked_count(self, obj):
        return obj._acked


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    """Answers: did user X get message M, when, through which instance, did the client ack?"""

    list_display = ["message_link", "user", "connection", "instance", "delivered_at", "acked_at", "acked"]
    list_filter = ["instance", "delivered_at", ("acked_at", admin.EmptyFieldListFilter)]
    search_fields = ["=message__id", "user__username", "connection", "instance", "message__topic"]
    list_select_related = ["message", "user"]
    date_hierarchy = "delivered_at"
    readonly_fields = ["message", "user", "connection", "instance", "delivered_at", "acked_at"]

    @admin.display(description="message", ordering="message")
    def message_link(self, obj):
        url = reverse("admin:notifications_message_change", args=[obj.message_id])
        return format_html('<a href="{}">{}</a>', url, obj.message_id)

    @admin.display(boolean=True, description="acked")
    def acked(self, obj):
        return obj.acked_at is not None

    def has_delete_permission(self, request, obj=None):
        """The delivery log is evidence: only a superuser may remove rows of it (e.g. to comply
        with an erasure request). Old rows go with `manage.py prune_realtime`."""
        return request.user.is_active and request.user.is_superuser


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    list_display = ["name", "restricted_to", "description", "created_at"]
    search_fields = ["name", "description"]
    filter_horizontal = ["groups"]

    @admin.display(description="restricted to")
    def restricted_to(self, obj):
        names = [group.name for group in obj.groups.all()]
        return ", ".join(names) if names else "everyone signed in"

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("groups")


@admin.register(InboundFrame)
class InboundFrameAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "user",
        "event",
        "status",
        "attempts",
        "processed_by",
        "instance",
        "accepted_at",
        "processed_at",
        "short_error",
    ]
    list_filter = ["status", "event", "processed_by", "accepted_at"]
    search_fields = ["=id", "user__username", "event", "ref", "connection", "error"]
    list_select_related = ["user"]
    date_hierarchy = "accepted_at"
    actions = ["requeue_dead"]
    readonly_fields = [
        "id",
        "user",
        "ref",
        "event",
        "payload",
        "status",
        "attempts",
        "connection",
        "instance",
        "processed_by",
        "error",
        "accepted_at",
        "processed_at",
    ]

    @admin.display(description="error")
    def short_error(self, obj):
        return (obj.error[:80] + "…") if len(obj.error) > 80 else obj.error

    def has_requeue_permission(self, request) -> bool:
        """Requeueing changes frames (status, attempts): it needs the change permission, not view.

        `has_change_permission` says no to everyone here (the form is read-only), so the action
        asks for the permission itself.
        """
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename('change', opts)}")

    @admin.action(description="Requeue the selected dead frames", permissions=["requeue"])
    def requeue_dead(self, request, queryset):
        outcome = requeue_dead_frames(
            list(queryset.filter(status=InboundFrame.Status.DEAD).values_list("id", flat=True))
        )
        if outcome.requeued:
            self.message_user(request, f"Requeued {outcome.requeued} dead frame(s).", messages.SUCCESS)
        if outcome.error:
            self.message_user(request, f"Stopped requeueing: {outcome.error}", messages.ERROR)


# The overview page, /admin/overview/ (notifications/admin_overview.py), linked from the index.
install_overview(admin.site)
