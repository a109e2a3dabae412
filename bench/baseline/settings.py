"""Settings of the baseline: the smallest Channels app a tutorial would build, on channels_redis.

No database, no authentication, no delivery log: only the channel layer. The layer's capacity
is RAISED from channels_redis's defaults (capacity 100, expiry 60) to 100,000 messages per
channel and its expiry to 600 s, so that group_send drops nothing in the benchmarks: it drops
silently at capacity, and a message that waits in a channel longer than the expiry is gone (on
a slow day the saturated fan-out kept messages waiting over 60 s and lost up to 10,000
deliveries a run).
"""

import os

SECRET_KEY = "bench-baseline-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels"]  # for the `runworker` management command
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.baseline.urls"
ASGI_APPLICATION = "bench.baseline.asgi.application"
DATABASES: dict = {}
USE_TZ = True
INSTANCE_ID = os.environ.get("BASELINE_INSTANCE_ID", f"baseline-{os.getpid()}")

# For the DRF view only (`/drf/api/v1/messages/`): no authentication, JSON in and out.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": None,
}

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [os.environ.get("BASELINE_REDIS_URL", "redis://127.0.0.1:6379/0")],
            # Each benchmark run has its own prefix, deleted afterwards.
            "prefix": os.environ.get("BASELINE_PREFIX", "bench-baseline"),
            "capacity": 100_000,
            "expiry": 600,
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"django.channels.worker": {"level": "INFO"}},
}
