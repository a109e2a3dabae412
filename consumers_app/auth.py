"""WebSocket authentication: the session cookie (browsers) or a short-lived signed ticket."""

import logging
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.core import signing

logger = logging.getLogger(__name__)

TICKET_SALT = "realtime.ws-ticket"


def issue_ticket(user) -> str:
    """A signed, timestamped ticket naming the user; valid for RT_TICKET_TTL seconds."""
    return signing.dumps({"u": user.pk}, salt=TICKET_SALT, compress=False)


def user_for_ticket(ticket: str):
    """The active user a valid, unexpired ticket names, else None."""
    try:
        data = signing.loads(ticket, salt=TICKET_SALT, max_age=settings.RT_TICKET_TTL)
    except signing.SignatureExpired:
        logger.info("refused an expired socket ticket")
        return None
    except signing.BadSignature:
        logger.info("refused a forged socket ticket")
        return None
    if not isinstance(data, dict) or "u" not in data:
        return None
    return get_user_model().objects.filter(pk=data["u"], is_active=True).first()


class TicketOrSessionAuth:
    """`?ticket=` authenticates on its own; without one, the session cookie does.

    A ticket socket skips the cookie and session middleware altogether (less work and less
    memory per socket); a bad ticket means anonymous, so the handshake is refused.
    """

    def __init__(self, inner):
        self.inner = inner
        self.with_session = AuthMiddlewareStack(inner)

    async def __call__(self, scope, receive, send):
        query = parse_qs(scope.get("query_string", b"").decode("latin1"))
        tickets = query.get("ticket")
        if not tickets:
            return await self.with_session(scope, receive, send)
        user = await database_sync_to_async(user_for_ticket)(tickets[0])
        return await self.inner(dict(scope, user=user or AnonymousUser()), receive, send)


class BrowserOriginValidator(OriginValidator):
    """A browser's Origin must be one of ALLOWED_HOSTS; clients that send none are not browsers.

    Browsers always send Origin on a WebSocket handshake, so that is where cross-site
    hijacking is stopped; a non-browser client authenticates with a ticket instead.
    """

    def valid_origin(self, parsed_origin):
        if parsed_origin is None:
            return True
        return super().valid_origin(parsed_origin)


def protected(inner):
    """Origin check, then ticket or session authentication, around the socket routes."""
    return BrowserOriginValidator(TicketOrSessionAuth(inner), list(settings.ALLOWED_HOSTS))
