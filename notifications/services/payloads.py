"""What a payload may hold, at the API and at the socket alike."""

from typing import Any

NUL_RULE = "a payload may not contain the character U+0000 (the database cannot store it)"


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
