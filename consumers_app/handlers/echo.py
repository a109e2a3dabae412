"""Built-in `echo`: the payload goes back to the sender's user (CONTRACT §4)."""

from typing import Any

from consumers_app.handlers.base import HandlerContext, InboundHandler
from notifications.models import InboundFrame


class EchoHandler(InboundHandler):
    writes_to_database = False

    def handle(self, frame: InboundFrame, context: HandlerContext) -> None:
        context.reply("echo", echo_payload(frame, frame.payload))


def echo_payload(frame: InboundFrame, data: Any) -> dict[str, Any]:
    return {"inbound": str(frame.id), "data": data}
