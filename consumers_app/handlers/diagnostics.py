"""Diagnostic events (RT_DIAGNOSTICS=1), to try a deployment's failure handling."""

import time
from typing import Any

from consumers_app.handlers.base import HandlerContext, InboundHandler, InvalidPayload
from consumers_app.handlers.echo import echo_payload
from notifications.models import InboundFrame

MAX_SLEEP_MS = 10_000


class DiagnosticFailure(RuntimeError):
    """Raised on purpose by `diag.fail`."""


class FailHandler(InboundHandler):
    """Always raises, so the frame is retried, then dead-lettered."""

    writes_to_database = False

    def handle(self, frame: InboundFrame, context: HandlerContext) -> None:
        raise DiagnosticFailure("diag.fail always fails")


class SleepHandler(InboundHandler):
    """Waits `ms` milliseconds, then echoes: a slow frame, to kill a worker in the middle of."""

    writes_to_database = False

    def validate(self, payload: Any) -> None:
        ms = payload.get("ms") if isinstance(payload, dict) else None
        if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms <= MAX_SLEEP_MS:
            raise InvalidPayload(f'payload must be {{"ms": N}} with 0 <= N <= {MAX_SLEEP_MS}')

    def handle(self, frame: InboundFrame, context: HandlerContext) -> None:
        assert frame.payload is not None  # validate() accepted it at the socket: {"ms": N}
        time.sleep(frame.payload["ms"] / 1000)
        context.reply("echo", echo_payload(frame, frame.payload))
