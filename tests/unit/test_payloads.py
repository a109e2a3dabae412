"""notifications/services/payloads.py: one payload check for the API and the socket."""

import orjson
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from notifications.services import payloads
from notifications.services.payloads import PayloadRejected, check_payload, json_depth


def nested(depth: int, leaf=1):
    """A list nested `depth` deep around `leaf` (built without recursion)."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def nested_objects(depth: int):
    value = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    "value, depth",
    [
        (1, 0),
        ("x", 0),
        (None, 0),
        ([1], 1),
        ({"a": 1}, 1),
        ([], 1),
        ({}, 1),
        ([[[]]], 3),
        ({"a": [1, {"b": [2]}], "c": 3}, 4),
        ([1, [2], [[3]], 4], 3),
    ],
)
def test_json_depth_counts_arrays_and_objects(value, depth):
    assert json_depth(value, 100) == depth


def test_json_depth_of_a_wide_value_is_its_deepest_branch():
    wide = [nested(3)] * 1000 + [nested(7)] + [nested(2)] * 1000
    assert json_depth(wide, 100) == 8


class CountingList(list):
    """A list that counts how often it is walked (json_depth must stop at the limit)."""

    walked = 0

    def __iter__(self):
        CountingList.walked += 1
        return super().__iter__()


def test_json_depth_of_10000_levels_needs_no_recursion_and_stops_at_the_limit():
    deep = 1
    for _ in range(10_000):
        deep = CountingList([deep])
    CountingList.walked = 0
    assert json_depth(deep, 64) == 65
    assert CountingList.walked <= 66, "walked past the limit"
    # Counted in full as well, without RecursionError.
    assert json_depth(deep, 20_000) == 10_000
    assert json_depth(nested(10_000), 20_000) == 10_000
    assert json_depth(nested_objects(10_000), 20_000) == 10_000


def rejected(payload, **limits) -> PayloadRejected:
    with pytest.raises(PayloadRejected) as caught:
        check_payload(payload, **limits)
    return caught.value


def test_64_deep_is_accepted_with_the_default_settings(settings):
    settings.RT_MAX_JSON_DEPTH = 64
    settings.RT_MAX_PAYLOAD_BYTES = 65536
    assert check_payload(nested(64)) == b"[" * 64 + b"1" + b"]" * 64
    check_payload(nested_objects(64))


@pytest.mark.parametrize("depth", [65, 254, 255, 256, 1000, 10_000])
def test_deeper_than_64_is_invalid(settings, depth):
    settings.RT_MAX_JSON_DEPTH = 64
    assert rejected(nested(depth)).code == "invalid"
    assert rejected(nested_objects(depth)).code == "invalid"


def test_the_depth_limit_comes_from_settings_or_the_argument(settings):
    settings.RT_MAX_JSON_DEPTH = 3
    check_payload(nested(3))
    assert rejected(nested(4)).code == "invalid"
    check_payload(nested(10), max_depth=10)
    assert rejected(nested(11), max_depth=10).code == "invalid"


@pytest.mark.parametrize(
    "payload",
    [2**64, -(2**63) - 1, {"n": [2**64]}, "\ud800", {"k": "a\udfffb"}, {"\ud800": 1}],
    ids=["2**64", "below-int64", "nested-2**64", "lone-surrogate", "nested-surrogate", "surrogate-key"],
)
def test_what_a_strict_encoder_refuses_is_invalid(payload):
    error = rejected(payload)
    assert error.code == "invalid"
    assert "JSON" in error.detail


@pytest.mark.parametrize(
    "payload",
    [float("inf"), float("-inf"), float("nan"), {"x": [1.0, float("inf")]}],
    ids=["inf", "-inf", "nan", "nested-inf"],
)
def test_numbers_json_cannot_hold_are_invalid(payload):
    """Python's parser reads 1e400 as infinity; orjson would write it as null (a silent change)
    and PostgreSQL refuses it (a 500 at the API)."""
    assert rejected(payload).code == "invalid"


@pytest.mark.parametrize(
    "payload",
    ["\x00", "a\x00b", {"k": "\x00"}, {"\x00": 1}, [["x", {"y": "\x00"}]]],
    ids=["nul", "inner-nul", "value", "key", "nested"],
)
def test_u0000_anywhere_is_invalid(payload):
    assert rejected(payload).code == "invalid"


def test_an_escaped_backslash_u0000_text_is_not_nul():
    # The text `\u0000` (a backslash and five characters) is no NUL character.
    assert check_payload("\\u0000") == b'"\\\\u0000"'


def test_over_max_bytes_is_too_large(settings):
    settings.RT_MAX_PAYLOAD_BYTES = 100
    check_payload("x" * 98)  # 100 bytes encoded, quotes included
    assert rejected("x" * 99).code == "too_large"
    assert rejected("x" * 50, max_bytes=10).code == "too_large"


def test_the_encoded_payload_is_returned():
    assert check_payload({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    assert check_payload(None) == b"null"
    assert check_payload(2**64 - 1) == b"18446744073709551615"


def _storable(value) -> bool:
    """orjson encodes it and it holds no U+0000 (the rules after depth and numbers)."""
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return not payloads._walk(value)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(alphabet='ab[]{}"n'),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=20,
)


@given(payload=_json_values, max_depth=st.integers(0, 6))
@hypothesis_settings(max_examples=300, deadline=None)
def test_the_encoding_shortcut_decides_as_the_walk_does(payload, max_depth):
    """Depth and finite numbers are read off the encoding when it plainly shows them: never a
    payload accepted that the walk through it refuses, or the other way round."""
    depth, finite = payloads._scan(payload, max_depth)  # the walk the shortcut spares
    expected = depth <= max_depth and finite and _storable(payload)
    try:
        check_payload(payload, max_bytes=1 << 20, max_depth=max_depth)
        accepted = True
    except PayloadRejected as error:
        accepted = False
        assert error.code == "invalid"
    assert accepted == expected
