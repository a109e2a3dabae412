# Shared by bin/run and bin/test: the virtualenv and the services the project needs.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root for: $*"; return 1; fi
}

apt_install() {
  log "installing with apt-get: $*"
  if [ -z "${APT_UPDATED:-}" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Create the virtualenv and install a requirements file, once per change of that file.
ensure_venv() {
  local requirements="$1"
  if [ ! -x "$PY" ]; then
    log "creating virtualenv in $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(basename "$requirements")"
  local digest
  digest="$(cat "$ROOT/requirements.txt" "$ROOT/$requirements" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    log "installing $requirements"
    "$PY" -m pip install -q --disable-pip-version-check -r "$ROOT/$requirements"
    echo "$digest" >"$stamp"
  fi
}

# RabbitMQ from AMQP_URL: if it is local and not answering, start it (installing it if absent).
ensure_rabbitmq() {
  local url="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
  local hostport="${url#*@}"; hostport="${hostport%%/*}"
  local host="${hostport%%:*}" port="${hostport##*:}"
  [ "$port" = "$hostport" ] && port=5672
  if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
  case "$host" in
    127.*|localhost|::1) ;;
    *) log "RabbitMQ at $host:$port is not answering (remote: not starting it)"; return 1 ;;
  esac
  if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  for _ in $(seq 1 120); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
      as_root rabbitmqctl await_startup >/dev/null 2>&1 || true
      return 0
    fi
    sleep 1
  done
  log "RabbitMQ did not start within 120s"; return 1
}

# PostgreSQL on 127.0.0.1:5432 if this machine has one; returns 1 if there is none to use.
ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then return 0; fi
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    log "starting PostgreSQL"
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 1; done
  fi
  return 1
}

# Debian's Chromium for the browser tests (Playwright drives it; its own download cannot work here).
ensure_chromium() {
  if [ -x /usr/bin/chromium ]; then return 0; fi
  apt_install chromium || log "could not install chromium: browser tests will be skipped"
}

# nginx as the local load balancer (its own config and ports; the system's config is never used).
ensure_nginx() {
  if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then return 0; fi
  apt_install nginx-light || apt_install nginx || log "could not install nginx"
}
