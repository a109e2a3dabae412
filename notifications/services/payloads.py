"""What a payload may hold, at the API and at the socket alike (CONTRACT §3, §4).

A payload the server accepts must stay encodable on every path after it (broker messages,
replies, COPY rows): whatever a strict encoder (orjson) or PostgreSQL would refuse later is
refused here, at the edge, with the reason.
"""

import math
import re
from typing import Any

import orjson
from django.conf import settings

NUL_RULE = "a payload may not contain the character U+0000 (the database cannot store it)"


class PayloadRejected(ValueError):
    """`code` is the socket's error code: `too_large` (413 at the API) or `invalid` (400)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def check_payload(payload: Any, max_bytes: int | None = None, max_depth: int | None = None) -> bytes:
    """The payload encoded, or PayloadRejected: too deep, not encodable, too large, or holding U+0000."""
    max_bytes = settings.RT_MAX_PAYLOAD_BYTES if max_bytes is None else max_bytes
    max_depth = settings.RT_MAX_JSON_DEPTH if max_depth is None else max_depth
    try:
        encoded: bytes | None = orjson.dumps(payload)
    except TypeError:  # said below, after the depth (orjson also refuses nesting past 255)
        encoded = None
    if encoded is None or not _plainly_shallow_and_finite(encoded, max_depth):
        depth, finite = _scan(payload, max_depth)
        if depth > max_depth:
            raise PayloadRejected("invalid", f"a payload may be nested at most {max_depth} levels deep")
        if not finite:
            raise PayloadRejected(
                "invalid", "a payload's numbers must be finite (JSON has no Infinity or NaN)"
            )
        if encoded is None:
            try:
                encoded = orjson.dumps(payload)
            except TypeError as exc:  # orjson.JSONEncodeError: integers past 64 bits, lone surrogates
                raise PayloadRejected("invalid", f"the payload cannot be stored as JSON: {exc}") from None
    if len(encoded) > max_bytes:
        raise PayloadRejected("too_large", f"payloads are limited to {max_bytes} bytes")
    if has_nul(payload, encoded):
        raise PayloadRejected("invalid", NUL_RULE)
    return encoded


def _plainly_shallow_and_finite(encoded: bytes, max_depth: int) -> bool:
    """Whether a payload's encoding alone shows it no deeper than `max_depth`, its numbers finite
    (else `_scan` walks through it, and says what is wrong).

    Every level of nesting opens a `[` or `{`, so no more of those than `max_depth` bounds the
    depth (brackets inside strings only count too many); orjson writes a NaN or an infinity as
    `null`, so an encoding without `null` holds none. Most payloads pass here without a walk in
    Python, which was a third of a batch's validation.
    """
    return b"null" not in encoded and encoded.count(b"[") + encoded.count(b"{") <= max_depth


# A float of 1e18 or more, as orjson writes it: the parser may have rounded an integer literal.
_LARGE_FLOAT = re.compile(rb"\d[eE]\+?(1[89]|[2-9]\d|\d{3})")


def may_hold_rounded_integers(encoded: bytes) -> bool:
    """Whether an orjson-parsed payload (encoded as `encoded`) may hold an integer past 64 bits
    that orjson read as the nearest float; Python's json then tells exactly (rarely needed)."""
    return _LARGE_FLOAT.search(encoded) is not None


def json_depth(value: Any, limit: int) -> int:
    """Nesting of arrays and objects (`1` is 0 deep, `[1]` 1), counted up to `limit` + 1 at most."""
    return _scan(value, limit)[0]


def _scan(value: Any, limit: int) -> tuple[int, bool]:
    """(depth, all numbers finite), walking iteratively: a payload nested thousands deep costs no
    recursion, and the walk stops as soon as it is deeper than `limit`."""
    deepest = 0
    finite = True
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, float):
            finite = finite and math.isfinite(item)
            continue
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest, finite
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list, float)))
    return deepest, finite


def has_nul(payload: Any, encoded: bytes) -> bool:
    """Whether any string or key of `payload` (JSON-encoded as `encoded`) holds U+0000.

    PostgreSQL refuses it in JSON values. The encoded form is searched first, so the walk
    through the payload happens only for the rare payload that may hold one.
    """
    return b"\\u0000" in encoded and _walk(payload)


def _walk(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_walk(key) or _walk(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_walk(item) for item in value)
    return False
