"""ASGI entry point: HTTP through Django, `/ws/` through the Channels consumer.

Daphne runs no lifespan events, so the broker bridge is started here: scheduled on Daphne's
event loop when Daphne is the server, and on first use (any request or socket) otherwise. It is
also installed as this process's publisher, for the API and the admin.
"""

import os
import sys

import django
from channels.routing import ProtocolTypeRouter, URLRouter

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402

django_http = get_asgi_application()

from consumers_app.auth import protected  # noqa: E402
from consumers_app.bridge import ensure_bridge, get_bridge  # noqa: E402
from consumers_app.lifecycle import install_drain_handler  # noqa: E402
from consumers_app.routing import websocket_urlpatterns  # noqa: E402
from notifications import publishing  # noqa: E402
from notifications.api.fast_publish import FastPublish  # noqa: E402
from realtime_project.gc_tuning import tune_garbage_collector  # noqa: E402
from realtime_project.switch_interval import shorten_switch_interval  # noqa: E402

# The API and the admin publish through this process's bridge (the one broker connection).
publishing.install(get_bridge)


class StartBridge:
    """Make sure this process's bridge is started before any scope is handled."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            ensure_bridge()
        return await self.app(scope, receive, send)


application = StartBridge(
    ProtocolTypeRouter(
        {
            # Token-authenticated publishes skip Django's middleware and DRF (see fast_publish).
            "http": FastPublish(django_http),
            "websocket": protected(URLRouter(websocket_urlpatterns)),
        }
    )
)

_daphne = sys.modules.get("daphne.server")
if _daphne is not None and "daphne" in os.path.basename(sys.argv[0]):
    # Under the daphne command: connect to RabbitMQ at start, not at the first request.
    _daphne.twisted_loop.call_soon(ensure_bridge)
    install_drain_handler(_daphne.twisted_loop)
    tune_garbage_collector()
    shorten_switch_interval()
