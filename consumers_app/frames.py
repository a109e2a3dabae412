"""What a client frame may hold (CONTRACT §4), checked before the consumer acts on it."""

import json
from typing import Any

MAX_REF_LENGTH = 100
# Streams a socket may `resume` (its topics are recovered by `subscribe` with `since`).
RESUMABLE = ("user", "broadcast")


class FrameError(Exception):
    """A client frame refused: answered with an `error` frame of this `code` and `detail`."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def exact_payload(text: str) -> Any:
    """The `payload` of a frame's text, as Python's parser reads it (integers exactly)."""
    try:
        return json.loads(text).get("payload")
    except (ValueError, RecursionError):
        raise FrameError("invalid", "the payload cannot be read exactly") from None


def since_of(frame: dict[str, Any]) -> tuple[int, str]:
    """A frame's `since`: `{"seq": N, "epoch": "E"}` with N >= 0."""
    since = frame.get("since")
    seq = since.get("seq") if isinstance(since, dict) else None
    epoch = since.get("epoch") if isinstance(since, dict) else None
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or not isinstance(epoch, str):
        raise FrameError("invalid", '`since` must be {"seq": N, "epoch": "E"} with N >= 0')
    if seq >= 2**63 or len(epoch) > 64:
        raise FrameError("invalid", "`since` is out of range")
    return seq, epoch


def ref_of(frame: Any) -> str | int | None:
    """A frame's `ref` as errors echo it: a string of at most MAX_REF_LENGTH characters or an
    integer; None for anything else (a frame with such a `ref` is refused)."""
    if not isinstance(frame, dict):
        return None
    ref = frame.get("ref")
    if isinstance(ref, bool) or not isinstance(ref, (str, int)):
        return None
    if len(str(ref)) > MAX_REF_LENGTH:
        return None
    return ref
