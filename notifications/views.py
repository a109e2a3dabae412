"""Pages for people (the API lives in notifications.api)."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render


@login_required
def index(request):
    """The live page: opens a socket with the session cookie and shows what arrives."""
    return render(request, "notifications/index.html", {"instance_id": settings.RT_INSTANCE_ID})
