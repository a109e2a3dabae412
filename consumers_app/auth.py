"""WebSocket authentication: the session cookie (browsers) or a short-lived signed ticket."""

import logging
from urllib.parse import ParseResult, parse_qs, urlparse

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from notifications.tickets import user_for_ticket

logger = logging.getLogger(__name__)


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
    """A browser's Origin must be this site itself, by scheme, host and port; clients that send
    none are not browsers (they authenticate with a ticket).

    As Django's CSRF check does for forms: the Origin must name a host of ALLOWED_HOSTS and
    equal the handshake's own scheme, Host and port, or be listed whole in CSRF_TRUSTED_ORIGINS
    (a page served from another origin of the same deployment). Behind a TLS proxy the scheme
    is the proxy's (SECURE_PROXY_SSL_HEADER).
    """

    async def __call__(self, scope, receive, send):
        headers = {name.decode("latin1"): value.decode("latin1") for name, value in scope.get("headers", [])}
        origin = headers.get("origin")
        if origin is not None and not self.same_site(origin, self.own_origin(scope, headers)):
            logger.info("refused a socket from origin %r", origin[:200])
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)

    @staticmethod
    def own_origin(scope, headers: dict[str, str]) -> str | None:
        host = headers.get("host")
        if not host:
            return None
        secure = scope.get("scheme") == "wss"
        proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
        if proxy_header:
            name, value = proxy_header
            forwarded = headers.get(name.removeprefix("HTTP_").lower().replace("_", "-"))
            if forwarded is not None:
                secure = forwarded.split(",")[0].strip() == value
        return f"{'https' if secure else 'http'}://{host}"

    def same_site(self, origin: str, own: str | None) -> bool:
        if origin in settings.CSRF_TRUSTED_ORIGINS:
            return True
        try:
            parsed = urlparse(origin)
            if own is None or not self.valid_origin(parsed):  # a host of ALLOWED_HOSTS
                return False
            return _endpoint(parsed) == _endpoint(urlparse(own))
        except ValueError:  # a malformed Origin or Host (say, a port that is not a number)
            return False


def _endpoint(url: ParseResult) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, (url.hostname or ""), url.port or default


def protected(inner):
    """Origin check, then ticket or session authentication, around the socket routes."""
    return BrowserOriginValidator(TicketOrSessionAuth(inner), list(settings.ALLOWED_HOSTS))
