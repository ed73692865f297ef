#!/usr/bin/env bash
# Stops the PostgreSQL server that start.sh started for STATE_DIR, by the PID in its pid file
# (never by process name): a fast shutdown (SIGINT: clients are disconnected, open transactions
# rolled back), then an immediate one (SIGQUIT), then SIGKILL to the server and the processes it
# had started. Idempotent: nothing running is not an error.
#
#   tests/postgres/stop.sh [STATE_DIR]      (default STATE_DIR: /var/tmp/testbot-postgres)
#
# The state dir (the cluster with the tests' databases, the log) is kept; delete it (after
# stop.sh) for a fresh cluster.
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-postgres}
TERM_SECS=${TESTBOT_POSTGRES_STOP_SECS:-15}

log() { echo "stop.sh: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root"; exit 1; }
[ -d "$STATE_DIR" ] || exit 0
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
exec 9>"$STATE_DIR/lock"
flock -w 120 9 || { log "another start.sh/stop.sh holds $STATE_DIR/lock for more than 120s"; exit 1; }
PIDFILE=$STATE_DIR/data/postmaster.pid

# alive PID: the process exists and is not a zombie (an exited server is not our child: whoever
# adopted it reaps it, maybe late).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    case "${stat%% *}" in Z | X) return 1 ;; esac
}

# wait_gone PID SECS: succeeds once PID has exited (within SECS).
wait_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        alive "$1" || return 0
        sleep 0.1
    done
    ! alive "$1"
}

[ -s "$PIDFILE" ] || exit 0
pid=$(head -n 1 "$PIDFILE" | tr -dc '0-9')
if [ -z "$pid" ] || ! alive "$pid" ||
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]; then
    rm -f "$PIDFILE" # stale
    exit 0
fi

log "stopping postgres (pid $pid)"
kill -INT "$pid" 2>/dev/null || true
wait_gone "$pid" "$TERM_SECS" && exit 0 # the server removes its pid file itself

log "postgres (pid $pid) still running after ${TERM_SECS}s: immediate shutdown (SIGQUIT)"
kill -QUIT "$pid" 2>/dev/null || true
wait_gone "$pid" 5 && exit 0

# Its children (backends, background workers) by their parent PID, before it goes: they would
# outlive a SIGKILLed server for a moment.
children=$(ps -o pid= --ppid "$pid" 2>/dev/null | tr -s ' \n' ' ' || true)
log "postgres (pid $pid) still running: SIGKILL (with its processes:$children)"
# shellcheck disable=SC2086 # one PID a word
kill -KILL "$pid" $children 2>/dev/null || true
wait_gone "$pid" 5 || log "WARNING: postgres (pid $pid) survived SIGKILL"
for child in $children; do
    wait_gone "$child" 5 || log "WARNING: postgres process $child survived SIGKILL"
done
# What a killed server leaves behind (a stopped one removes them itself).
rm -f "$PIDFILE" "$STATE_DIR"/run/.s.PGSQL.*
