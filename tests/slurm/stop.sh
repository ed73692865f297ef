#!/usr/bin/env bash
# Stops the single-node Slurm that start.sh started for STATE_DIR, by the PIDs in its pid files
# (never by process name): SIGTERM, wait, SIGKILL after a timeout. Idempotent: nothing running is
# not an error.
#
#   tests/slurm/stop.sh [STATE_DIR]         (default STATE_DIR: /var/tmp/testbot-slurm)
#
# munged is stopped only if start.sh started it (STATE_DIR/run/munged.started-by-us), unless
# TESTBOT_SLURM_KEEP_MUNGE=1. A munged that was already running is left alone.
# The state dir (spool, logs, slurm.conf) is kept; delete it for a fresh cluster (job ids restart at 1).
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-slurm}
TERM_SECS=${TESTBOT_SLURM_STOP_SECS:-15}

log() { echo "stop.sh: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root"; exit 1; }
[ -d "$STATE_DIR" ] || exit 0
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
RUN=$STATE_DIR/run
export SLURM_CONF=$STATE_DIR/etc/slurm.conf # in case anything below calls Slurm

# stop_pidfile PIDFILE COMM
stop_pidfile() {
    local pidfile=$1 comm=$2 pid i
    [ -s "$pidfile" ] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null ||
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$comm" ]; then
        rm -f "$pidfile" # stale
        return 0
    fi
    log "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TERM_SECS * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$comm (pid $pid) still running after ${TERM_SECS}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
}

# Jobs still running would outlive slurmd (their slurmstepd keeps going): cancel them first, unless
# TESTBOT_SLURM_KEEP_JOBS=1 (e.g. to test that jobs survive a restart of the daemons).
ctld_pidfile=$RUN/slurmctld.pid
if [ "${TESTBOT_SLURM_KEEP_JOBS:-0}" != 1 ] && [ -s "$ctld_pidfile" ] && [ -f "$SLURM_CONF" ] &&
    kill -0 "$(tr -dc '0-9' <"$ctld_pidfile")" 2>/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
        # shellcheck disable=SC2086 # one job id a word
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < (TERM_SECS + 10) * 5; i++)); do
            [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null || true)" ] && break
            sleep 0.2
        done
    fi
fi

# slurmd first (it reports to slurmctld on the way down), then slurmctld.
stop_pidfile "$RUN/slurmd.pid" slurmd
stop_pidfile "$RUN/slurmctld.pid" slurmctld

MUNGE_OURS=$RUN/munged.started-by-us
if [ -f "$MUNGE_OURS" ] && [ "${TESTBOT_SLURM_KEEP_MUNGE:-0}" != 1 ]; then
    ours=$(tr -dc '0-9' <"$MUNGE_OURS")
    current=$(tr -dc '0-9' </run/munge/munged.pid 2>/dev/null || true)
    # Only if the munged we started is still the one running.
    if [ -n "$ours" ] && [ "$ours" = "$current" ]; then
        stop_pidfile /run/munge/munged.pid munged
    fi
    rm -f "$MUNGE_OURS"
fi
