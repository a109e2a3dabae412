"""consumers_app/processing.py: what a worker accepts as an inbound frame from the broker."""

import pytest

from consumers_app.processing import EVENT_MAX_CHARS, work_from_body

FRAME_ID = "3f2b8c1e-9d4a-4f6b-8e2a-1c5d7e9f0a1b"


def body(**changes):
    value = {"id": FRAME_ID, "user_id": 7, "event": "echo", "payload": {"n": 1}}
    value.update(changes)
    return {key: item for key, item in value.items() if item is not ...}


def test_a_valid_body_is_work():
    work = work_from_body(body(), redeliveries=2)
    assert work.frame_id == FRAME_ID
    assert work.body == body()
    assert work.redeliveries == 2


@pytest.mark.parametrize(
    "given", [FRAME_ID.upper(), FRAME_ID.replace("-", ""), "{" + FRAME_ID + "}", f"urn:uuid:{FRAME_ID}"]
)
def test_the_id_is_canonicalised(given):
    assert work_from_body(body(id=given), 0).frame_id == FRAME_ID


def test_user_id_may_be_absent_or_null():
    assert work_from_body(body(user_id=...), 0).frame_id == FRAME_ID
    assert work_from_body(body(user_id=None), 0).frame_id == FRAME_ID


def test_an_event_of_exactly_the_longest_length_is_accepted():
    assert EVENT_MAX_CHARS == 100
    work_from_body(body(event="e" * EVENT_MAX_CHARS), 0)


@pytest.mark.parametrize(
    "changes",
    [
        {"id": "nope"},
        {"id": ...},
        {"id": None},
        {"id": 12},
        {"id": [FRAME_ID]},
        {"id": ""},
        {"user_id": "x"},
        {"user_id": "7"},
        {"user_id": True},
        {"user_id": False},
        {"user_id": 7.0},
        {"user_id": [7]},
        {"event": ...},
        {"event": ""},
        {"event": None},
        {"event": 5},
        {"event": ["echo"]},
        {"event": "e" * (EVENT_MAX_CHARS + 1)},
    ],
    ids=lambda changes: "-".join(f"{k}={str(v)[:12]}" for k, v in changes.items()),
)
def test_a_body_a_socket_never_queues_is_refused(changes):
    with pytest.raises(ValueError):
        work_from_body(body(**changes), 0)


def test_the_error_names_the_bad_id_clipped():
    with pytest.raises(ValueError, match="UUID") as caught:
        work_from_body(body(id="n" * 1000), 0)
    assert len(str(caught.value)) < 200
