"""The publish endpoints without per-request framework cost: a small ASGI route in front of Django.

`POST /api/v1/messages/` and `POST /api/v1/messages/batch/` with `Authorization: Token KEY` are
served here, on the event loop: the token is checked against a small in-process cache, the
body parsed with orjson, validated by the same rules as PublishSerializer (DRF itself explains
whatever is not plainly valid), stored in ONE database hop, published with a confirm from the
loop itself (no thread hop), marked published in a second hop, and answered with the same JSON
as the DRF views. Django's middleware stack, DRF's request machinery and the thread hops of a
sync view cost ~10 ms of CPU per request; this path a fraction of that.

Anything else, or anything this path does not answer exactly as DRF would, goes to Django
unchanged (the body it read is replayed): other paths and methods, session cookies, missing or
unknown tokens (DRF's 401 with WWW-Authenticate), inactive users, no permission (403), a Host
not in ALLOWED_HOSTS, an HTTPS redirect, a content type or
Accept header other than JSON, oversized or malformed bodies. Errors after parsing (400 field
errors, 409/422/404 for Idempotency-Key, 413 for a payload, 429 with Retry-After, 503) are DRF's
exceptions rendered as DRF renders them; DRF's user throttle is counted here in memory
(`UserWindows`). The DRF views stay for everything above and for the OpenAPI schema.

A token's user and permission are remembered per process for CREDENTIAL_TTL seconds, and
forgotten at once in this process when the token, the user, or a user's or group's
permissions change (signals); other processes notice within CREDENTIAL_TTL.

(Answering exactly as DRF would, on its own, takes the length: credentials, throttle, grouping
of concurrent publishes, and the hand-over to Django are its parts.)
"""

import asyncio
import collections
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

import orjson
from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.signals import setting_changed
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.http.request import split_domain_port, validate_host
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import APIException, Throttled
from rest_framework.settings import api_settings
from rest_framework.throttling import UserRateThrottle

from notifications import jsonutil
from notifications.api import views
from notifications.api.flows import (
    Flow,
    PublishBatch,
    PublishOne,
    accept_together,
    finish_together,
    publish_together,
)

logger = logging.getLogger(__name__)

MESSAGES_PATH = "/api/v1/messages/"
BATCH_PATH = "/api/v1/messages/batch/"
# Seconds a token's user and permission are remembered in this process (the DRF views remember
# a permission as long: `CanPublish`). Changes made in this process apply at once.
CREDENTIAL_TTL = 10.0
CREDENTIAL_CACHE_MAX = 10_000
# Threads for this path's database work: each hop holds one (and one pooled connection) for a
# few queries. More would only queue on PostgreSQL's locks and the two cores.
DB_THREADS = 4
PUBLISH_PERMISSION = "notifications.add_message"
# Messages stored together at most (one transaction, one COPY; their broker messages are cut at
# BROKER_BATCH_ITEMS per routing key anyway): single publishes, or whole batches (a larger batch
# goes alone).
GROUP_MAX = 200
BATCH_GROUP_MAX = 2000

T = TypeVar("T")
# A request waiting in a group, and where its answer goes.
Waiting = tuple[Flow, asyncio.Future[dict[str, Any]]]


@dataclass(frozen=True)
class Credential:
    user: User
    may_publish: bool
    expires: float


_credentials: dict[str, Credential] = {}
_hosts: dict[bytes, bool] = {}
_executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="fast-publish-db")


def forget_credentials(*args: Any, **kwargs: Any) -> None:
    """Signal receiver: a token, a user or permissions changed in this process."""
    _credentials.clear()


def forget_hosts(*args: Any, **kwargs: Any) -> None:
    """Signal receiver: settings changed (tests)."""
    _hosts.clear()


def _connect_signals() -> None:
    setting_changed.connect(forget_hosts, dispatch_uid="fast-publish-settings")
    for model in (Token, User):
        post_save.connect(
            forget_credentials, sender=model, dispatch_uid=f"fast-publish-save-{model.__name__}"
        )
        post_delete.connect(
            forget_credentials, sender=model, dispatch_uid=f"fast-publish-delete-{model.__name__}"
        )
    for through in (User.user_permissions.through, User.groups.through, Group.permissions.through):
        m2m_changed.connect(
            forget_credentials, sender=through, dispatch_uid=f"fast-publish-m2m-{through.__name__}"
        )


_connect_signals()


async def in_db_thread(function: Callable[..., T], *args: Any) -> T:
    """Run sync database work in one hop to this path's threads (connections handled as Channels does)."""
    return await DatabaseSyncToAsync(function, thread_sensitive=False, executor=_executor)(*args)


def _look_up(key: str) -> Credential | None:
    token = Token.objects.select_related("user").filter(key=key).first()
    if token is None or not token.user.is_active:
        return None
    user = token.user
    return Credential(user, user.has_perm(PUBLISH_PERMISSION), time.monotonic() + CREDENTIAL_TTL)


async def credential(key: str) -> Credential | None:
    """The token's user and permission (cached), or None for an unknown token or inactive user."""
    cached = _credentials.get(key)
    if cached is not None and cached.expires > time.monotonic():
        return cached
    found = await in_db_thread(_look_up, key)
    if found is not None:
        if len(_credentials) >= CREDENTIAL_CACHE_MAX:
            _credentials.clear()
        _credentials[key] = found
    else:
        _credentials.pop(key, None)
    return found


class UserWindows:
    """DRF's UserRateThrottle, same rule and rate (`RT_API_RATE`), kept in this process's memory.

    DRF keeps each user's request times as a list in Django's cache, copied (pickled) in and out
    on every request: at 100,000/min that list grows to thousands of entries and costs more than
    the rest of the request. Here a deque per user. The fast path and the DRF views count apart
    (both per process, as DRF's local-memory cache already is).
    """

    def __init__(self) -> None:
        self.history: dict[Any, collections.deque[float]] = {}

    def check(self, user: User) -> float | None:
        """None if allowed (and counted), else the seconds to wait, as DRF computes them."""
        throttle = UserRateThrottle()
        if throttle.rate is None:
            return None
        num_requests, duration = throttle.parse_rate(throttle.rate)
        if num_requests is None or duration is None:
            return None
        now = time.time()
        history = self.history.get(user.pk)
        if history is None:
            if len(self.history) >= CREDENTIAL_CACHE_MAX:
                self.history.clear()
            history = self.history[user.pk] = collections.deque()
        while history and history[-1] <= now - duration:
            history.pop()
        if len(history) >= num_requests:
            remaining = duration - (now - history[-1]) if history else duration
            available = num_requests - len(history) + 1
            return remaining / available if available > 0 else float(duration)
        history.appendleft(now)
        return None


def throttled(windows: UserWindows, user: User, scope: dict[str, Any]) -> APIException | None:
    """DRF's throttles for this request: the exception to answer with, or None (counted)."""
    classes: list[Any] = list(api_settings.DEFAULT_THROTTLE_CLASSES)
    for throttle_class in classes:
        if throttle_class is UserRateThrottle:
            wait = windows.check(user)
            if wait is not None:
                return Throttled(wait)
            continue
        client = scope.get("client") or ("", 0)
        request = SimpleNamespace(user=user, META={"REMOTE_ADDR": client[0]})
        throttle = throttle_class()
        if not throttle.allow_request(request, None):
            return Throttled(throttle.wait())
    return None


def host_allowed(host: bytes) -> bool:
    """Django's Host check (`HttpRequest.get_host`), remembered per Host value."""
    known = _hosts.get(host)
    if known is None:
        allowed_hosts = settings.ALLOWED_HOSTS
        if settings.DEBUG and not allowed_hosts:
            allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]
        domain, _ = split_domain_port(host.decode("latin-1"))
        known = bool(domain) and validate_host(domain, allowed_hosts)
        if len(_hosts) > 1000:
            _hosts.clear()
        _hosts[host] = known
    return known


def _is_json(content_type: bytes) -> bool:
    kind, _, params = content_type.partition(b";")
    if kind.strip().lower() != b"application/json":
        return False
    params = params.strip().lower().replace(b" ", b"")
    return params in (b"", b"charset=utf-8")


def _accepts_json(accept: bytes | None) -> bool:
    if accept is None:
        return True
    accept = accept.lower()
    if b"indent" in accept:  # DRF would indent: leave it to DRF
        return False
    return b"application/json" in accept or b"*/*" in accept or b"application/*" in accept


def _is_secure(scope: dict[str, Any], headers: dict[bytes, bytes]) -> bool:
    proxy_header = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy_header:
        name, secure_value = proxy_header
        header = name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
        value = headers.get(header)
        if value is not None:
            return value.decode("latin-1").split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") == "https"


def response_headers(secure: bool, length: int) -> list[tuple[bytes, bytes]]:
    """What Django's middleware and DRF put on the views' JSON answers."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(length).encode()),
        (b"allow", b"POST, OPTIONS"),
    ]
    if settings.X_FRAME_OPTIONS:
        headers.append((b"x-frame-options", settings.X_FRAME_OPTIONS.encode()))
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"x-content-type-options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        value = policy if isinstance(policy, str) else ",".join(policy)
        headers.append((b"referrer-policy", value.encode()))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append((b"cross-origin-opener-policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode()))
    if secure and settings.SECURE_HSTS_SECONDS:
        value = f"max-age={settings.SECURE_HSTS_SECONDS}"
        if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
            value += "; includeSubDomains"
        if settings.SECURE_HSTS_PRELOAD:
            value += "; preload"
        headers.append((b"strict-transport-security", value.encode()))
    return headers


def error_body(exc: APIException) -> Any:
    """An APIException's JSON, as DRF's exception handler gives it."""
    detail = exc.detail
    return detail if isinstance(detail, (dict, list)) else {"detail": detail}


class Together:
    """Publishes that arrive while the previous ones are being stored are stored together.

    One group at a time is stored (one database hop: one transaction, one numbering statement,
    one COPY, `flows.accept_together`); meanwhile the next requests gather. A stored group is then
    published (several messages per broker message, each confirmed) and recorded (one hop) while
    the next group is stored. Idle, a request goes alone at once; under load, PostgreSQL commits,
    and the broker confirms and takes, once per group instead of once per request, and the
    requests to one stream stop queueing one commit at a time on its row lock. (Batch requests
    too, in their own groups: concurrent batches to the same users otherwise each lock all their
    streams from numbering to commit, one after the other.)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit  # messages in a group at most (at least one request)
        self.waiting: list[Waiting] = []
        self.storing = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def publish(self, flow: Flow) -> dict[str, Any]:
        """The request's 202 record, or raise its APIException (or a database error)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append((flow, future))
        if not self.storing:
            self.storing = True
            self._spawn(self._store())
        return await asyncio.shield(future)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _store(self) -> None:
        try:
            while self.waiting:
                group, self.waiting = self._next_group()
                started = time.perf_counter()
                try:
                    await in_db_thread(accept_together, [flow for flow, _ in group])
                except Exception as exc:
                    self._settle(group, exc)
                    continue
                self._spawn(self._publish(group, started, time.perf_counter()))
        finally:
            self.storing = False

    def _next_group(self) -> tuple[list[Waiting], list[Waiting]]:
        """The first waiting requests up to `limit` messages (at least one), and the rest."""
        size = taken = 0
        for flow, _ in self.waiting:
            if taken and size + flow.size > self.limit:
                break
            size += flow.size
            taken += 1
        return self.waiting[:taken], self.waiting[taken:]

    async def _publish(self, group: list[Waiting], started: float, stored: float) -> None:
        flows = [flow for flow, _ in group]
        try:
            await publish_together(flows)
            confirmed = time.perf_counter()
            await in_db_thread(finish_together, flows)
        except Exception as exc:
            self._settle(group, exc)
            return
        self._settle(group, None)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%d publishes together: stored in %.1f ms, confirmed in %.1f ms, recorded in %.1f ms",
                len(group),
                (stored - started) * 1000,
                (confirmed - stored) * 1000,
                (time.perf_counter() - confirmed) * 1000,
            )

    @staticmethod
    def _settle(group: list[Waiting], failure: Exception | None) -> None:
        for flow, future in group:
            if future.done():
                continue
            if failure is not None:
                future.set_exception(failure)
            elif flow.error is not None:
                future.set_exception(flow.error)
            elif flow.result is not None:
                future.set_result(flow.result)
            else:
                future.set_exception(RuntimeError("a publish ended without an answer"))


class FastPublish:
    """ASGI: the publish endpoints served directly for token requests; everything else to `app`."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.together = Together(GROUP_MAX)
        self.batches = Together(BATCH_GROUP_MAX)
        self.windows = UserWindows()
        # RT_FAST_PUBLISH=0 sends every request through Django (to compare, or to rule this out).
        self.enabled = os.environ.get("RT_FAST_PUBLISH", "1") != "0"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.enabled:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == MESSAGES_PATH:
            return await self._serve(scope, receive, send, PublishOne, views.max_single_request_bytes())
        if path == BATCH_PATH:
            return await self._serve(scope, receive, send, PublishBatch, views.BATCH_MAX_BYTES)
        return await self.app(scope, receive, send)

    async def _serve(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        flow_class: type[PublishOne] | type[PublishBatch],
        limit: int,
    ) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in headers:  # a repeated header: Django joins them; let it
                return await self.app(scope, receive, send)
            headers[name] = value
        key = self._token(headers)
        length = headers.get(b"content-length", b"")
        if (
            key is None
            or not length.isdigit()
            or int(length) > limit
            or not _is_json(headers.get(b"content-type", b""))
            or not _accepts_json(headers.get(b"accept"))
            or not self._host_ok(headers)
            or settings.DISALLOWED_USER_AGENTS
        ):
            return await self.app(scope, receive, send)
        secure = _is_secure(scope, headers)
        if settings.SECURE_SSL_REDIRECT and not secure:
            return await self.app(scope, receive, send)

        read = await self._read(receive, int(length))
        if read is None:
            return  # the client went away: nobody to answer
        body, more = read
        replay = self._replaying(body, more, receive)
        if more or len(body) != int(length):
            return await self.app(scope, replay, send)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return await self.app(scope, replay, send)  # DRF's parser says what is wrong
        # Only plainly valid bodies stay here: whatever DRF must explain (or would read otherwise
        # than orjson) goes to the view, which gives DRF's own errors.
        plain = flow_class.plain(parsed)
        if plain is None:
            return await self.app(scope, replay, send)
        try:
            found = await credential(key)
        except Exception:
            logger.exception("token check failed; handing the request to Django")
            return await self.app(scope, replay, send)
        if found is None or not found.may_publish:
            return await self.app(scope, replay, send)  # DRF's 401 or 403
        refused = throttled(self.windows, found.user, scope)
        if refused is not None:
            return await self._respond(send, refused.status_code, error_body(refused), secure, refused)

        idempotency_key = headers.get(b"idempotency-key")
        flow = flow_class(
            found.user,
            parsed,
            idempotency_key.decode("latin-1") if idempotency_key is not None else None,
            plain=plain,
        )
        try:
            together = self.together if isinstance(flow, PublishOne) else self.batches
            answer = await together.publish(flow)
        except APIException as exc:
            return await self._respond(send, exc.status_code, error_body(exc), secure, exc)
        except Exception:
            logger.exception("publishing through %s failed", scope["path"])
            return await self._respond(send, 500, {"detail": "Internal server error."}, secure)
        await self._respond(send, 202, answer, secure)

    @staticmethod
    def _token(headers: dict[bytes, bytes]) -> str | None:
        """The key of `Authorization: Token KEY` (DRF's TokenAuthentication reads it so), else None."""
        value = headers.get(b"authorization")
        if value is None:
            return None
        parts = value.split()
        if len(parts) != 2 or parts[0].lower() != b"token":
            return None
        try:
            return parts[1].decode()
        except UnicodeDecodeError:
            return None

    @staticmethod
    def _host_ok(headers: dict[bytes, bytes]) -> bool:
        host = None
        if settings.USE_X_FORWARDED_HOST:
            host = headers.get(b"x-forwarded-host")
        host = host or headers.get(b"host")
        return host is not None and host_allowed(host)

    @staticmethod
    async def _read(receive: Any, length: int) -> tuple[bytes, bool] | None:
        """(the body, whether more follows), reading no further than past `length` bytes; None
        when the client went away."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if not more or size > length:
                return b"".join(chunks), more

    @staticmethod
    def _replaying(body: bytes, more: bool, receive: Any) -> Callable[[], Awaitable[dict]]:
        """A `receive` that gives Django the body already read, then whatever follows."""
        pending = [{"type": "http.request", "body": body, "more_body": more}]

        async def replay() -> dict:
            if pending:
                return pending.pop()
            return await receive()

        return replay

    @staticmethod
    async def _respond(
        send: Any, status: int, data: Any, secure: bool, exc: APIException | None = None
    ) -> None:
        body = jsonutil.dumps(data)
        headers = response_headers(secure, len(body))
        wait = getattr(exc, "wait", None)
        if wait:
            headers.append((b"retry-after", b"%d" % wait))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
