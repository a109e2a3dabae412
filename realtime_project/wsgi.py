"""WSGI entry point (admin and API only; sockets need the ASGI application)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "realtime_project.settings")
application = get_wsgi_application()
