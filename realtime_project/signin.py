"""Sign-in throttling (django-axes): the client's address, what a success resets, the lockout page."""

import ipaddress
import logging
import math

from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username
from axes.models import AccessAttempt
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

logger = logging.getLogger(__name__)


def client_ip(request: HttpRequest) -> str | None:
    """The client's address: the entry the outermost trusted proxy appended to X-Forwarded-For.

    `RT_TRUSTED_PROXIES` proxies in front each append the address they saw, so the one that many
    places from the right is the client as the outermost proxy saw it; entries further left are
    whatever the client sent and are never trusted. Without trusted proxies, REMOTE_ADDR.
    """
    remote = request.META.get("REMOTE_ADDR")
    trusted = settings.RT_TRUSTED_PROXIES
    if trusted <= 0:
        return remote
    forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    forwarded = [part for part in forwarded if part]
    if len(forwarded) < trusted:
        return remote  # it did not come through every proxy
    try:
        return str(ipaddress.ip_address(forwarded[-trusted]))
    except ValueError:
        logger.warning("Unparsable X-Forwarded-For entry from %s; counting the proxy's address", remote)
        return remote


class SignInThrottle(AxesDatabaseHandler):
    """Axes' database handler (shared by every instance), with a narrower reset on success.

    Axes resets every attempt matching any lockout parameter, so with per-address counting one
    successful sign-in would also wipe the failures from that address against OTHER usernames:
    an attacker with an account of their own could reset the counters between guesses. Only the
    failures for the username that signed in are forgotten here.
    """

    def reset_user_attempts(self, request: HttpRequest, credentials: dict | None = None) -> int:
        username = get_client_username(request, credentials)
        if not username:
            return 0
        count, _ = AccessAttempt.objects.filter(username=username).delete()
        return count


def locked_out(request: HttpRequest, original_response=None, credentials: dict | None = None) -> HttpResponse:
    """The page a locked-out sign-in gets: 429, saying for how long (AXES_LOCKOUT_CALLABLE)."""
    minutes = max(1, math.ceil(settings.AXES_COOLOFF_TIME.total_seconds() / 60))
    context = {"failure_limit": settings.AXES_FAILURE_LIMIT, "minutes": minutes}
    response = render(request, "registration/locked_out.html", context, status=429)
    response["Retry-After"] = str(minutes * 60)
    return response
