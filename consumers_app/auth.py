"""WebSocket authentication: the session cookie (browsers) or a short-lived signed ticket."""

import logging
from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from notifications.tickets import issue_ticket, user_for_ticket

logger = logging.getLogger(__name__)

__all__ = ["issue_ticket", "protected"]


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
