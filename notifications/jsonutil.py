"""JSON encoding for everything the deployment sends or stores: fast, and total on stored data.

orjson encodes almost every payload; it refuses integers past 64 bits. The edge refuses such
integers in payloads (API and socket alike), but PostgreSQL's jsonb turns a large float back
into one: a payload's `1e20` is read back as `100000000000000000000`. Such an integer can only
have been a float, so it is written as the float again, instead of failing a reply, a gap fill
or a history read.
"""

from typing import Any

import orjson

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    option = orjson.OPT_SORT_KEYS if sort_keys else None
    try:
        return orjson.dumps(value, option=option)
    except TypeError:
        return orjson.dumps(_floats_for_huge_integers(value), option=option)


def _floats_for_huge_integers(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_MIN <= value <= _INT_MAX:
        return float(value)
    if isinstance(value, dict):
        return {key: _floats_for_huge_integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_floats_for_huge_integers(item) for item in value]
    return value
