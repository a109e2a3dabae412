"""Reading an inbound broker message: its frames, and how often they were delivered before."""

from aio_pika.abc import AbstractIncomingMessage

from consumers_app.processing import Work, work_from_body
from consumers_app.settling import REDELIVERIES_HEADER, header_int
from notifications import broker


def read_frames(message: AbstractIncomingMessage) -> list[Work]:
    """The frames of a message; ValueError or TypeError if any is not one a socket queued."""
    bodies = broker.unpack(broker.decode(message.body), broker.FRAMES)
    return [work_from_body(body, redeliveries(message)) for body in bodies]


def redeliveries(message: AbstractIncomingMessage) -> int:
    """Deliveries of this frame that died with their worker: the broker's count, plus the count
    it carried when it was split out of a larger message."""
    return header_int(message, "x-delivery-count") + header_int(message, REDELIVERIES_HEADER)
