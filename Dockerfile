# The app image: one image for every process of the deployment (CONTRACT §1).
#   web instance (default):  daphne -b 0.0.0.0 -p 8000 realtime_project.asgi:application
#   workers:                 python manage.py run_workers --concurrency 4
#   schema:                  python manage.py migrate --noinput
# Settings come from the environment (DJANGO_SECRET_KEY, AMQP_URL, DATABASE_URL, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so a code change does not reinstall them (every one ships a wheel).
COPY requirements.txt .
RUN pip install -r requirements.txt

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app app

# The code stays root-owned and read-only to the app user. staticfiles/ only exists to keep
# WhiteNoise quiet: it serves straight from the app folders (no collectstatic step).
COPY . .
RUN mkdir -p staticfiles

USER app
EXPOSE 8000

# Liveness of a web instance (workers and migrate disable it in docker-compose.yml).
# The probes answer whatever the Host header (realtime_project/probes.py).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request as u; r = u.urlopen(u.Request('http://127.0.0.1:8000/healthz', headers={'Host': 'localhost'}), timeout=2); sys.exit(r.status != 200)"]

CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "realtime_project.asgi:application"]
