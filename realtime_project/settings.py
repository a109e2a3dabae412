"""Settings, all read from the environment (CONTRACT §1) with defaults for one machine.

(Django's settings are one module by design; each knob says why it is there.)
"""

import datetime
import os
import socket
from pathlib import Path

import dj_database_url
from django.core.checks.security.base import (
    SECRET_KEY_INSECURE_PREFIX,
    SECRET_KEY_MIN_LENGTH,
    SECRET_KEY_MIN_UNIQUE_CHARACTERS,
)
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def weak_secret_key_reason(key: str) -> str | None:
    """Why a key is too weak to sign sessions and tickets with, or None.

    The rules of Django's deployment check (security.W009), plus the placeholder of .env.example:
    a check that only warns is easy to miss, so production refuses to start instead.
    """
    if "change-me" in key.lower():
        return "it still contains the placeholder 'change-me'"
    if key.startswith(SECRET_KEY_INSECURE_PREFIX):
        return f"it starts with {SECRET_KEY_INSECURE_PREFIX!r} (a key made for development)"
    if len(key) < SECRET_KEY_MIN_LENGTH:
        return f"it has {len(key)} characters, fewer than {SECRET_KEY_MIN_LENGTH}"
    if len(set(key)) < SECRET_KEY_MIN_UNIQUE_CHARACTERS:
        return f"it has fewer than {SECRET_KEY_MIN_UNIQUE_CHARACTERS} distinct characters"
    return None


DEBUG = env_bool("DJANGO_DEBUG")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is required unless DJANGO_DEBUG=1 (refusing to start with a guessable key)"
        )
    SECRET_KEY = "dev-insecure-key-only-for-DJANGO_DEBUG=1"
elif not DEBUG and (reason := weak_secret_key_reason(SECRET_KEY)):
    raise ImproperlyConfigured(
        f"DJANGO_SECRET_KEY is too weak for DJANGO_DEBUG=0: {reason}. Make one with: "
        'python3 -c "import secrets; print(secrets.token_urlsafe(50))"'
    )

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

# --- TLS behind a proxy: all off by default, so the plain-HTTP local deployment keeps working ---
if env_bool("DJANGO_SECURE_PROXY_SSL_HEADER"):
    # Only where the proxy in front sets X-Forwarded-Proto itself (ours do: deploy/nginx*).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES")
SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS")
SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD")
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT")
# Prometheus and probes talk plain HTTP to an instance's own port: never redirect them.
SECURE_REDIRECT_EXEMPT = [r"^metrics$", r"^healthz$", r"^readyz$"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "axes",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "notifications",
    "consumers_app",
]

MIDDLEWARE = [
    "realtime_project.probes.ProbeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out sign-in into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "realtime_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "realtime_project.asgi.application"
WSGI_APPLICATION = "realtime_project.wsgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool("RT_DB_POOL", True):
    # Requests run on short-lived threads under ASGI, so per-thread persistent connections
    # leak; psycopg's pool shares a bounded set of connections across all threads instead.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # The pool replaces broken connections itself; Django's check would add a query per checkout.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int("RT_DB_POOL_SIZE", 10),
        "timeout": 10,
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A database that does not answer fails a connection within seconds instead of hanging the
    # caller, and one runaway statement cannot hold its locks and connection for ever.
    # Migrations on a big table may need RT_DB_STATEMENT_TIMEOUT_MS=0 for that one command.
    _pg_options = DATABASES["default"].setdefault("OPTIONS", {})
    _pg_options["connect_timeout"] = env_int("RT_DB_CONNECT_TIMEOUT", 5)
    _statement_timeout_ms = env_int("RT_DB_STATEMENT_TIMEOUT_MS", 30_000)
    if _statement_timeout_ms > 0:
        _pg_options["options"] = (
            f"{_pg_options.get('options', '')} -c statement_timeout={_statement_timeout_ms}".strip()
        )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes write one SQLite file: WAL lets readers run beside the writer, and
    # IMMEDIATE transactions wait for the lock instead of failing half-way with "locked".
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    if os.environ.get("RT_TEST_SQLITE_NAME"):
        DATABASES["default"]["TEST"] = {"NAME": os.environ["RT_TEST_SQLITE_NAME"]}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise serves straight from the app folders, so one daphne command is a complete
# web instance (no collectstatic step), with DJANGO_DEBUG=0 too.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = [
    # django-axes first: it refuses a locked-out sign-in before any password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

# Proxies in front of the web instances that append to X-Forwarded-For (bin/run's and compose's
# nginx: 1). 0 trusts no header: the client is REMOTE_ADDR.
RT_TRUSTED_PROXIES = env_int("RT_TRUSTED_PROXIES", 0)


# Failed sign-ins (sign-in page and admin), counted in the database so every instance shares them:
# RT_LOGIN_FAILURE_LIMIT failures for one username, or from one client address, lock it out for
# RT_LOGIN_LOCKOUT_MINUTES, the right password included. API tokens and sockets are not affected.
AXES_FAILURE_LIMIT = env_int("RT_LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = datetime.timedelta(minutes=env_float("RT_LOGIN_LOCKOUT_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_HANDLER = "realtime_project.signin.SignInThrottle"
AXES_RESET_ON_SUCCESS = True
# A lockout lasts its time from the failure that caused it; tries during it do not extend it.
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "realtime_project.signin.locked_out"
AXES_CLIENT_IP_CALLABLE = "realtime_project.signin.client_ip"

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first: a request without credentials gets 401 with WWW-Authenticate.
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["notifications.api.parsers.SafeJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "notifications.api.errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["rest_framework.throttling.UserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": os.environ.get("RT_API_RATE", "100000/min")},
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Realtime messaging API",
    "DESCRIPTION": "Publish to WebSockets on every web instance; read the delivery log.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Docs assets come from the installed sidecar package, not a CDN.
    "REDOC_DIST": "SIDECAR",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # Messages and inbound frames both have a `status`, with different choices: named apart.
    "ENUM_NAME_OVERRIDES": {
        "MessageStatusEnum": "notifications.models.Message.Status",
        "InboundStatusEnum": "notifications.models.InboundFrame.Status",
    },
}

# --- Realtime (CONTRACT §1) ---------------------------------------------------------------
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RT_NAMESPACE = os.environ.get("RT_NAMESPACE", "rt")
RT_INSTANCE_ID = os.environ.get("RT_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}"
RT_TICKET_TTL = env_int("RT_TICKET_TTL", 60)
RT_MAX_FRAME_BYTES = env_int("RT_MAX_FRAME_BYTES", 65536)
RT_MAX_PAYLOAD_BYTES = env_int("RT_MAX_PAYLOAD_BYTES", 65536)
RT_SOCKET_RATE = env_float("RT_SOCKET_RATE", 50.0)
RT_DIAGNOSTICS = env_bool("RT_DIAGNOSTICS")
# Seconds a broker publish may wait for its confirm before the caller gets "unavailable".
RT_PUBLISH_TIMEOUT = env_float("RT_PUBLISH_TIMEOUT", 5.0)
# AMQP heartbeat: short, so a dead broker is noticed in seconds rather than minutes.
RT_AMQP_HEARTBEAT = env_int("RT_AMQP_HEARTBEAT", 10)
# Milliseconds an instance queue outlives its last consumer (x-expires).
RT_INSTANCE_QUEUE_EXPIRES_MS = env_int("RT_INSTANCE_QUEUE_EXPIRES_MS", 300_000)
# Frames one socket may have waiting to be written before it is closed as a slow reader.
RT_SOCKET_QUEUE = env_int("RT_SOCKET_QUEUE", 1000)
# Bytes written to a socket but not yet read by its client before it is closed as a slow reader.
RT_SOCKET_MAX_BUFFER_BYTES = env_int("RT_SOCKET_MAX_BUFFER_BYTES", 1024 * 1024)
# How often (seconds) and how many rows at most the delivery log writes in one batch.
RT_DELIVERY_LOG_INTERVAL = env_float("RT_DELIVERY_LOG_INTERVAL", 0.25)
RT_DELIVERY_LOG_BATCH = env_int("RT_DELIVERY_LOG_BATCH", 5000)
RT_DELIVERY_LOG_ENABLED = env_bool("RT_DELIVERY_LOG", True)
# Delivery log rows a web instance keeps while its database is slow or down; then the oldest go.
RT_DELIVERY_LOG_MAX_BUFFERED = env_int("RT_DELIVERY_LOG_MAX_BUFFERED", 500_000)
# Seconds a web instance takes to close its sockets and flush its log on SIGTERM.
RT_DRAIN_SECONDS = env_float("RT_DRAIN_SECONDS", 10.0)
# Days of messages, deliveries and inbound frames `manage.py prune_realtime` keeps.
RT_RETENTION_DAYS = env_int("RT_RETENTION_DAYS", 30)

RT_INBOUND_HANDLERS = {
    "echo": "consumers_app.handlers.echo.EchoHandler",
    "chat.message": "consumers_app.handlers.chat.ChatMessageHandler",
}
if RT_DIAGNOSTICS:
    RT_INBOUND_HANDLERS |= {
        "diag.fail": "consumers_app.handlers.diagnostics.FailHandler",
        "diag.sleep": "consumers_app.handlers.diagnostics.SleepHandler",
    }
# Attempts before an inbound frame is dead-lettered, and the waits between them (seconds).
RT_INBOUND_MAX_ATTEMPTS = env_int("RT_INBOUND_MAX_ATTEMPTS", 5)
# Deepest nesting of arrays and objects in a payload (CONTRACT §1): strict JSON encoders refuse
# 255 levels, so anything accepted stays encodable on every path after it.
RT_MAX_JSON_DEPTH = env_int("RT_MAX_JSON_DEPTH", 64)
# Topics one socket may be subscribed to at once.
RT_MAX_SUBSCRIPTIONS = env_int("RT_MAX_SUBSCRIPTIONS", 100)
# Seconds a message or inbound frame may stay committed but unconfirmed before the workers'
# sweeper publishes it (a publish takes at most RT_PUBLISH_TIMEOUT).
RT_SWEEP_GRACE_SECONDS = env_int("RT_SWEEP_GRACE_SECONDS", 30)
# Seconds between checks for deactivated accounts whose sockets are still open (closed then).
RT_ACCOUNT_CHECK_SECONDS = env_float("RT_ACCOUNT_CHECK_SECONDS", 30.0)
# Streams and recovery (CONTRACT §4): messages kept per stream for recovery, and for how long.
RT_HISTORY_SIZE = env_int("RT_HISTORY_SIZE", 1000)
RT_HISTORY_TTL = env_float("RT_HISTORY_TTL", 600.0)
RT_INBOUND_RETRY_DELAYS = [1, 2, 4, 8]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {
            "format": f"%(asctime)s %(levelname)s [{RT_INSTANCE_ID}] %(name)s: %(message)s",
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("RT_LOG_LEVEL", "INFO")},
    "loggers": {
        "aiormq": {"level": "WARNING"},
        # Sign-in failures and lockouts are warnings; its start-up banner in every process is not.
        "axes": {"level": "WARNING"},
        "aio_pika": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}
