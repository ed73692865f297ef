#!/usr/bin/env bash
# Starts a throwaway PostgreSQL 15 server on loopback for the tests (its own cluster under
# STATE_DIR, never the packages' cluster on port 5432), idempotently.
#
#   tests/postgres/start.sh [STATE_DIR]         (default STATE_DIR: /var/tmp/testbot-postgres)
#   eval "$(tests/postgres/start.sh)"           (sets TESTBOT_TEST_DATABASE_URL in the calling shell)
#
# Progress and errors go to stderr; stdout gets exactly one line, the last one:
#   export TESTBOT_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:PORT/postgres
# PORT is 15432 unless TESTBOT_POSTGRES_PORT says otherwise. The URL names the maintenance database
# `postgres` as the superuser `postgres` (trust authentication, loopback only): tests create their
# own database each (CREATE DATABASE with a unique name).
# Running it again while the server runs is a no-op (it re-checks that the server answers).
# Needs root and the packages from install.sh. Stop with stop.sh STATE_DIR.
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-postgres}
PORT=${TESTBOT_POSTGRES_PORT:-15432}
WAIT_SECS=${TESTBOT_POSTGRES_WAIT_SECS:-60}
PG_BIN=/usr/lib/postgresql/15/bin

log() { echo "start.sh: $*" >&2; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (the server runs as the account postgres)"
case "$PORT" in '' | *[!0-9]*) die "TESTBOT_POSTGRES_PORT must be a port number: $PORT" ;; esac
[ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || die "TESTBOT_POSTGRES_PORT out of range: $PORT"
[ "$PORT" -ne 5432 ] || die "port 5432 belongs to the packages' own cluster; pick another"
for cmd in initdb pg_ctl postgres psql; do
    [ -x "$PG_BIN/$cmd" ] || die "$PG_BIN/$cmd not found: run tests/postgres/install.sh first"
done
getent passwd postgres >/dev/null || die "no account postgres: run tests/postgres/install.sh first"

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
case "$STATE_DIR" in *[[:space:]]* | *[\"\'\\]*)
    die "STATE_DIR must not contain whitespace or quotes: $STATE_DIR" ;;
esac
# The server's unix socket (STATE_DIR/run/.s.PGSQL.PORT) must fit in 107 bytes.
[ "${#STATE_DIR}" -le 80 ] || die "STATE_DIR is too long for a unix socket path (max 80 chars): $STATE_DIR"
chmod 0755 "$STATE_DIR"
# The server runs as postgres: every directory above STATE_DIR must let it through.
runuser -u postgres -- test -x "$STATE_DIR" ||
    die "the account postgres cannot enter $STATE_DIR (a parent directory is closed to it)"

# One start.sh/stop.sh at a time per state dir.
exec 9>"$STATE_DIR/lock"
flock -w 120 9 || die "another start.sh/stop.sh holds $STATE_DIR/lock for more than 120s"

DATA=$STATE_DIR/data
RUN=$STATE_DIR/run
LOGS=$STATE_DIR/log
install -d -o postgres -g postgres -m 0755 "$RUN" "$LOGS"
URL=postgres://postgres@127.0.0.1:$PORT/postgres

# Commands as postgres, from a directory it may read (not root's cwd).
as_postgres() { (cd "$STATE_DIR" && runuser -u postgres -- "$@"); }

# pid_alive PIDFILE COMM: prints the PID and succeeds when PIDFILE's first line names a live
# process whose command name is COMM (guards against a stale pid file whose PID was reused). A
# zombie is not alive: a server that died is not our child, and whoever adopted it may reap it late.
pid_alive() {
    local pid stat
    [ -s "$1" ] || return 1
    pid=$(head -n 1 "$1" | tr -dc '0-9')
    [ -n "$pid" ] && stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    case "${stat%% *}" in Z | X) return 1 ;; esac
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

logtail() {
    echo "---- tail of $LOGS/postgres.log:"
    tail -n 25 "$LOGS/postgres.log" 2>/dev/null || echo "(missing)"
}

answers() { # succeeds when the server answers a query over TCP on PORT
    PGCONNECT_TIMEOUT=5 "$PG_BIN/psql" -X -q -At -d "$URL" -c 'select 1' >/dev/null 2>&1
}

# ---------------------------------------------------------------- cluster
# A fresh cluster in a temporary directory, moved into place once complete: an interrupted
# initdb leaves no half cluster behind.
if [ ! -s "$DATA/PG_VERSION" ]; then
    log "creating a cluster in $DATA"
    rm -rf "$DATA" "$DATA.new"
    install -d -o postgres -g postgres -m 0700 "$DATA.new"
    as_postgres "$PG_BIN/initdb" -D "$DATA.new" -U postgres --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 --no-sync >"$LOGS/initdb.log" 2>&1 ||
        die "initdb failed; its output:
$(tail -n 25 "$LOGS/initdb.log")"
    echo "include = 'testbot.conf'" >>"$DATA.new/postgresql.conf"
    mv "$DATA.new" "$DATA"
fi
[ "$(cat "$DATA/PG_VERSION")" = 15 ] ||
    die "$DATA holds a PostgreSQL $(cat "$DATA/PG_VERSION") cluster, not 15: delete STATE_DIR"

# Settings for tests, included last from postgresql.conf: loopback and our own socket directory
# only; connections for several brokers and the test suite at once; no durability on disk (a
# test cluster need not survive a crash of the machine, and fsync is the slow part).
new_conf=$(cat <<EOF
# Written by tests/postgres/start.sh: a throwaway PostgreSQL on loopback for testbot's tests.
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$RUN'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
log_timezone = 'UTC'
timezone = 'UTC'
EOF
)
CONF=$DATA/testbot.conf
conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    conf_changed=1
    printf '%s\n' "$new_conf" >"$CONF.tmp"
    chown postgres:postgres "$CONF.tmp"
    chmod 0600 "$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
fi

# ---------------------------------------------------------------- server
# postmaster.pid: line 1 the PID, line 4 the port it listens on.
PIDFILE=$DATA/postmaster.pid
if pid=$(pid_alive "$PIDFILE" postgres); then
    running_port=$(sed -n 4p "$PIDFILE" | tr -dc '0-9')
    if [ "$running_port" != "$PORT" ]; then
        die "the server of $STATE_DIR (pid $pid) runs on port $running_port, not $PORT: stop it
first (tests/postgres/stop.sh $STATE_DIR)"
    fi
    [ "$conf_changed" = 0 ] ||
        log "WARNING: testbot.conf changed while the server runs; restart with stop.sh + start.sh"
    answers || die "the server (pid $pid) runs but does not answer on $URL
$(logtail)"
    echo "export TESTBOT_TEST_DATABASE_URL=$URL"
    exit 0
fi

# The pid file and socket lock file left by a server that was killed: the server would refuse to
# start while their PID names any process (another one of the account postgres, or the killed
# server itself until it is reaped). No server runs for this state dir: they are stale.
rm -f "$PIDFILE" "$RUN/.s.PGSQL.$PORT" "$RUN/.s.PGSQL.$PORT.lock"

if command -v ss >/dev/null 2>&1; then
    listener=$(ss -Hltnp "sport = :$PORT" 2>/dev/null | head -n 1 || true)
    [ -z "$listener" ] || die "port $PORT is already in use (another STATE_DIR's server, or set
TESTBOT_POSTGRES_PORT). Listener: $listener"
fi

log "starting postgres on 127.0.0.1:$PORT"
# pg_ctl starts the server in its own session, with its output going to the log file, and waits
# until it accepts connections. Not with the lock's descriptor: the server would hold the lock
# for as long as it runs.
as_postgres "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOGS/postgres.log" -w -t "$WAIT_SECS" start \
    </dev/null >"$LOGS/pg_ctl.log" 2>&1 9>&- || die "pg_ctl could not start postgres (it waits ${WAIT_SECS}s at most):
$(cat "$LOGS/pg_ctl.log" 2>/dev/null)
$(logtail)"
pid_alive "$PIDFILE" postgres >/dev/null || die "postgres started but $PIDFILE names no live server
$(logtail)"
answers || die "postgres started but does not answer on $URL
$(logtail)"

echo "export TESTBOT_TEST_DATABASE_URL=$URL"
