"""Pages for people (the API lives in notifications.api)."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from notifications.services.topics import TOPIC_MAX_LENGTH

# Messages kept on the page: older ones are dropped so a busy topic cannot grow the DOM forever.
PAGE_MESSAGE_LIMIT = 200


@login_required
def index(request):
    """The live page: opens a socket with the session cookie and shows what arrives."""
    config = {
        # Same host and scheme as the page: the session cookie and Origin check then just work.
        "path": "/ws/",
        "user": request.user.get_username(),
        "maxMessages": PAGE_MESSAGE_LIMIT,
        "topicMaxLength": TOPIC_MAX_LENGTH,
    }
    return render(
        request,
        "notifications/index.html",
        {"instance_id": settings.RT_INSTANCE_ID, "realtime_config": config},
    )
