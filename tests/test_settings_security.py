"""Settings read from the environment at start: weak secret keys, TLS behind a proxy, and the
database timeouts. Each case starts a fresh Python process, as a deployment does."""

import json
import os
import secrets
import subprocess
import sys

import pytest
from django.db import connection

from tests.support.cluster import ROOT
from tests.support.cluster import test_database_url as database_url_of_tests

STRONG_KEY = secrets.token_urlsafe(50)


def run_django(env: dict[str, str], code: str = "print('started')", timeout: float = 60):
    """`django.setup()` then `code`, in a new process whose environment is only `env` (plus PATH)."""
    base = {
        key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "RT_", "DATABASE_"))
    }
    base |= {
        "DJANGO_SETTINGS_MODULE": "realtime_project.settings",
        "DATABASE_URL": "sqlite:////tmp/unused.db",
    }
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup()\n{code}"],
        cwd=ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def settings_json(env: dict[str, str], *names: str) -> dict:
    code = (
        "import json; from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n, None) for n in {list(names)!r}}}, default=str))"
    )
    result = run_django({"DJANGO_DEBUG": "1"} | env, code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def env_example_secret_key() -> str:
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("DJANGO_SECRET_KEY="):
            return line.partition("=")[2].strip()
    raise AssertionError(".env.example has no DJANGO_SECRET_KEY")


@pytest.mark.parametrize(
    "key, reason",
    [
        ("", "required"),
        ("short-but-not-empty", "fewer than 50"),
        ("django-insecure-" + secrets.token_urlsafe(50), "django-insecure-"),
        ("abcd" * 20, "fewer than 5 distinct"),
        (secrets.token_urlsafe(40) + "-change-me", "change-me"),
        (env_example_secret_key(), "change-me"),
    ],
    ids=["empty", "short", "insecure-prefix", "few-distinct", "change-me", "env-example"],
)
def test_production_refuses_a_weak_secret_key(key, reason):
    result = run_django({"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": key})
    assert result.returncode != 0, result.stdout
    assert "ImproperlyConfigured" in result.stderr and "DJANGO_SECRET_KEY" in result.stderr, result.stderr
    assert reason in result.stderr, result.stderr
    if key:
        assert key not in result.stderr, "the error must not print the key"


def test_production_starts_with_a_strong_key_and_debug_accepts_any():
    strong = run_django({"DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": STRONG_KEY})
    assert strong.returncode == 0 and "started" in strong.stdout, strong.stderr
    debug = run_django({"DJANGO_DEBUG": "1", "DJANGO_SECRET_KEY": "change-me"})
    assert debug.returncode == 0, debug.stderr


TLS_SETTINGS = (
    "SECURE_PROXY_SSL_HEADER",
    "SESSION_COOKIE_SECURE",
    "CSRF_COOKIE_SECURE",
    "SECURE_HSTS_SECONDS",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS",
    "SECURE_HSTS_PRELOAD",
    "SECURE_SSL_REDIRECT",
)


def test_tls_settings_are_off_by_default_so_plain_http_keeps_working():
    assert settings_json({}, *TLS_SETTINGS) == {
        "SECURE_PROXY_SSL_HEADER": None,
        "SESSION_COOKIE_SECURE": False,
        "CSRF_COOKIE_SECURE": False,
        "SECURE_HSTS_SECONDS": 0,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False,
        "SECURE_SSL_REDIRECT": False,
    }


def test_tls_settings_come_from_the_environment():
    env = {
        "DJANGO_SECURE_PROXY_SSL_HEADER": "1",
        "DJANGO_SECURE_COOKIES": "1",
        "DJANGO_HSTS_SECONDS": "31536000",
        "DJANGO_HSTS_INCLUDE_SUBDOMAINS": "1",
        "DJANGO_HSTS_PRELOAD": "1",
        "DJANGO_SECURE_SSL_REDIRECT": "1",
    }
    assert settings_json(env, *TLS_SETTINGS) == {
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
        "SECURE_HSTS_PRELOAD": True,
        "SECURE_SSL_REDIRECT": True,
    }


def test_behind_a_tls_proxy_requests_are_secure_and_plain_ones_redirected_but_metrics_are_not(
    client, settings
):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600
    plain = client.get("/accounts/login/")
    assert plain.status_code == 301 and plain["Location"].startswith("https://"), plain
    secure = client.get("/accounts/login/", headers={"X-Forwarded-Proto": "https"})
    assert secure.status_code == 200
    assert secure["Strict-Transport-Security"] == "max-age=3600"
    # The scraper and the probes talk plain HTTP to an instance's own port.
    assert client.get("/metrics").status_code == 200
    assert client.get("/healthz").status_code == 200


def postgres_url_or_skip() -> str:
    if connection.vendor != "postgresql":
        pytest.skip("the statement timeout is PostgreSQL's")
    return database_url_of_tests()


def test_database_timeouts_are_in_the_connection_options(db):
    url = postgres_url_or_skip()
    options = settings_json({"DATABASE_URL": url}, "DATABASES")["DATABASES"]["default"]["OPTIONS"]
    assert options["connect_timeout"] == 5
    assert options["options"] == "-c statement_timeout=30000"
    options = settings_json(
        {"DATABASE_URL": url, "RT_DB_CONNECT_TIMEOUT": "3", "RT_DB_STATEMENT_TIMEOUT_MS": "0"}, "DATABASES"
    )["DATABASES"]["default"]["OPTIONS"]
    assert options["connect_timeout"] == 3 and "options" not in options
    sqlite = settings_json({"DATABASE_URL": "sqlite:////tmp/unused.db"}, "DATABASES")
    assert "connect_timeout" not in sqlite["DATABASES"]["default"]["OPTIONS"]


SLEEP = """
import time
from django.db import OperationalError, connection
started = time.monotonic()
try:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(5)")
    print("finished", time.monotonic() - started)
except OperationalError as error:
    print("cancelled", time.monotonic() - started, type(error.__cause__).__name__)
"""


@pytest.mark.parametrize("pool", ["1", "0"], ids=["psycopg-pool", "no-pool"])
def test_a_statement_over_the_timeout_is_cancelled(db, pool):
    url = postgres_url_or_skip()
    env = {"DJANGO_DEBUG": "1", "DATABASE_URL": url, "RT_DB_STATEMENT_TIMEOUT_MS": "200", "RT_DB_POOL": pool}
    result = run_django(env, SLEEP)
    assert result.returncode == 0, result.stderr
    outcome, seconds, *cause = result.stdout.split()
    assert outcome == "cancelled", result.stdout
    assert float(seconds) < 3, "cancelled only after the statement had run anyway"
    assert cause == ["QueryCanceled"], cause
