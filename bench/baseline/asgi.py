"""ASGI application of the baseline: HTTP views, the socket consumer and the echo worker."""

import os

import django
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.baseline.settings")
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.urls import path  # noqa: E402

from bench.baseline.consumers import ECHO_CHANNEL, EchoWorker, TopicConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": get_asgi_application(),
        "websocket": URLRouter([path("ws/", TopicConsumer.as_asgi())]),
        # `python -m django runworker bench-echo` serves this channel.
        "channel": ChannelNameRouter({ECHO_CHANNEL: EchoWorker.as_asgi()}),
    }
)
