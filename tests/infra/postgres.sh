#!/usr/bin/env bash
# A throw-away PostgreSQL for greenstack's carbon-pool tests: Debian's `postgresql` package, a fresh
# initdb in $PG_DIR, started by hand with pg_ctl (no systemd) on 127.0.0.1:$PG_PORT, trust auth.
#
#   bash tests/infra/postgres.sh          # install if needed, start (reuses a running one), print the URL
#   bash tests/infra/postgres.sh stop     # stop it (pg_ctl, via its PID file; never by process name)
#   bash tests/infra/postgres.sh status   # exit 0 if it accepts connections
#
# Tests read GREENSTACK_TEST_PG_URL (the last line printed): postgresql://postgres@127.0.0.1:55432/postgres
# Durability is switched off (fsync, synchronous_commit): the data is disposable; locking is unchanged.
set -euo pipefail
D=${PG_DIR:-/tmp/greenstack-pg}
PORT=${PG_PORT:-55432}
URL="postgresql://postgres@127.0.0.1:$PORT/postgres"

pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
as_pg() {  # initdb/pg_ctl refuse to run as root: run them as the `postgres` user when we are root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
ready() { [ -n "$(pgbin)" ] && "$(pgbin)/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2; }
stop() {
  local bin; bin=$(pgbin)
  if [ -n "$bin" ] && [ -s "$D/data/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$D/data" -m fast -w -t 30 stop >/dev/null 2>&1 || true
  fi
}

case "${1:-start}" in
  stop) stop; exit 0 ;;
  status) if ready; then echo "postgres up: $URL"; exit 0; else echo "postgres not running on $PORT"; exit 1; fi ;;
  start) ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac

if [ -z "$(pgbin)" ] || [ ! -x "$(pgbin)/initdb" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
BIN=$(pgbin)

if ready && [ -s "$D/data/postmaster.pid" ]; then  # idempotent: already ours and running
  echo "postgres already up on 127.0.0.1:$PORT ($D)"
  echo "GREENSTACK_TEST_PG_URL=$URL"
  exit 0
fi
if ready; then
  echo "postgres.sh: port $PORT is taken by another server; set PG_PORT" >&2
  exit 1
fi

stop
rm -rf "$D"
mkdir -p "$D"
[ "$(id -u)" = 0 ] && chown postgres: "$D"
as_pg "$BIN/initdb" -D "$D/data" -U postgres -A trust -E UTF8 --no-sync >"$D/initdb.log" 2>&1 \
  || { cat "$D/initdb.log" >&2; exit 1; }
as_pg "$BIN/pg_ctl" -D "$D/data" -l "$D/postgres.log" -w -t 60 \
  -o "-p $PORT -k $D -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
  start >/dev/null || { tail -n 20 "$D/postgres.log" >&2; exit 1; }
for _ in $(seq 100); do ready && break; sleep 0.1; done
ready || { echo "postgres did not come up" >&2; tail -n 20 "$D/postgres.log" >&2; exit 1; }
echo "postgres up on 127.0.0.1:$PORT (pid $(head -n 1 "$D/data/postmaster.pid"), data $D/data)"
echo "GREENSTACK_TEST_PG_URL=$URL"
