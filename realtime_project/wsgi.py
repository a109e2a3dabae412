"""WSGI entry point (admin and API only; sockets need the ASGI application).

It holds no bridge, so it publishes through a broker connection of its own.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
application = get_wsgi_application()

from notifications import publishing  # noqa: E402

_publisher = publishing.ThreadedPublisher()
publishing.install(lambda: _publisher)
