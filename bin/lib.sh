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

# --- A private PostgreSQL cluster: bin/run's database when DATABASE_URL is not set ---------------

# The newest installed PostgreSQL's programs (Debian keeps initdb and pg_ctl out of PATH).
pg_bin() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
}

# Run as the owner of a private cluster. initdb and postgres refuse to run as root, so root
# uses the postgres system user (the package creates it); anyone else owns their cluster.
as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# start_private_postgres HOME PORT DB: start the cluster in HOME/data (created the first time)
# on 127.0.0.1:PORT, trust auth from 127.0.0.1 only and no Unix socket, and create database DB.
# Sets PG_PRIVATE_STARTED=1 when this call started it (so only then stop_private_postgres).
start_private_postgres() {
  local home="$1" port="$2" db="$3" bin data
  PG_PRIVATE_STARTED=0
  [[ "$port" =~ ^[0-9]+$ ]] || { log "not a port: $port"; return 1; }
  [[ "$db" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { log "not a database name: $db"; return 1; }
  if ! bin="$(pg_bin)"; then
    apt_install postgresql || true
    bin="$(pg_bin)" || { log "PostgreSQL is not installed and could not be (apt-get install postgresql)"; return 1; }
  fi
  data="$home/data"
  mkdir -p "$home"
  if [ "$(id -u)" = 0 ]; then
    chown postgres:postgres "$home"
    if ! runuser -u postgres -- test -w "$home"; then
      log "the postgres user cannot reach $home (a folder above it is closed): set RT_PG_DIR elsewhere"
      return 1
    fi
  fi
  if [ ! -s "$data/PG_VERSION" ]; then
    log "creating a private PostgreSQL cluster in $data"
    if ! as_pg_owner "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --no-locale >"$home/initdb.log" 2>&1; then
      cat "$home/initdb.log" >&2
      return 1
    fi
    printf '%s\n' "" "# bin/run's private cluster: TCP on loopback only, no Unix socket (port: pg_ctl -o -p)." \
      "listen_addresses = '127.0.0.1'" "unix_socket_directories = ''" >>"$data/postgresql.conf"
    printf '%s\n' "# bin/run's private cluster: trust, and only from this machine's 127.0.0.1." \
      "host all all 127.0.0.1/32 trust" >"$data/pg_hba.conf"
  fi
  if as_pg_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "the private PostgreSQL in $data is already running (not started here: left running)"
  else
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      log "port $port is taken: set RT_PG_PORT for the private PostgreSQL"
      return 1
    fi
    log "starting the private PostgreSQL on 127.0.0.1:$port (log: $home/postgres.log)"
    if ! as_pg_owner "$bin/pg_ctl" -D "$data" -l "$home/postgres.log" -o "-p $port" -w -t 60 start >/dev/null; then
      tail -20 "$home/postgres.log" >&2 || true
      return 1
    fi
    PG_PRIVATE_STARTED=1
  fi
  if [ -z "$("$bin/psql" -X -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
  fi
}

# stop_private_postgres HOME: stop the cluster in HOME/data (its postmaster, by its pid file).
stop_private_postgres() {
  local home="$1" bin
  bin="$(pg_bin)" || return 0
  log "stopping the private PostgreSQL"
  as_pg_owner "$bin/pg_ctl" -D "$home/data" -m fast -w -t 30 stop >/dev/null ||
    log "could not stop the private PostgreSQL in $home/data"
}
