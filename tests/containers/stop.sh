#!/usr/bin/env bash
# Removes the test containers left behind (label testbot.job, both engines), then stops the
# dockerd that start.sh started for STATE_DIR, by the PID in its pid file (never by process name):
# SIGTERM, wait, SIGKILL after a timeout. Idempotent: nothing running is not an error.
#
#   tests/containers/stop.sh [STATE_DIR]     (default STATE_DIR: /var/tmp/testbot-containers)
#
# The state dir (images, podman storage, configs, dockerd.log) is kept, so the next start.sh is
# fast; delete it (after stop.sh) for a fresh state.
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-containers}
TERM_SECS=${TESTBOT_CONTAINERS_STOP_SECS:-30}
DOCKER=${TESTBOT_DOCKER:-/usr/bin/docker}

log() { echo "stop.sh: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root"; exit 1; }
[ -d "$STATE_DIR" ] || exit 0
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
exec 9>"$STATE_DIR/lock"
flock -w 120 9 || { log "another start.sh/stop.sh holds $STATE_DIR/lock for more than 120s"; exit 1; }
D=$STATE_DIR/docker
PIDFILE=$D/dockerd.pid
export DOCKER_HOST=unix://$STATE_DIR/docker.sock
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
export CONTAINERS_CONF=$STATE_DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$STATE_DIR/storage.conf

# pid_alive PIDFILE COMM: prints the PID when PIDFILE names a live process called COMM.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

# stop_pid PID NAME: SIGTERM, up to TERM_SECS, then SIGKILL.
stop_pid() {
    local pid=$1 name=$2 i
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TERM_SECS * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "$name (pid $pid) still running after ${TERM_SECS}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    log "WARNING: $name (pid $pid) survived SIGKILL"
}

# remove_labelled CLIENT...: removes all containers (running or not) labelled testbot.job.
remove_labelled() {
    local ids
    ids=$(timeout 30 "$@" ps -aq --filter label=testbot.job 2>/dev/null || true)
    [ -n "$ids" ] || return 0
    log "removing $1 containers labelled testbot.job: $(tr '\n' ' ' <<<"$ids")"
    # shellcheck disable=SC2086 # one id a word
    timeout 60 "$@" rm -f $ids >/dev/null 2>&1 || log "WARNING: '$1 rm -f' failed for some of: $ids"
}

# ---------------------------------------------------------------- podman (no daemon)
if [ -f "$CONTAINERS_CONF" ] && [ -f "$CONTAINERS_STORAGE_CONF" ] && command -v podman >/dev/null 2>&1; then
    # -t 0: podman's rm -f otherwise waits the 10 s stop timeout for a PID 1 that ignores SIGTERM.
    ids=$(timeout 30 podman ps -aq --filter label=testbot.job 2>/dev/null || true)
    if [ -n "$ids" ]; then
        log "removing podman containers labelled testbot.job: $(tr '\n' ' ' <<<"$ids")"
        # shellcheck disable=SC2086 # one id a word
        timeout 60 podman rm -f -t 0 $ids >/dev/null 2>&1 ||
            log "WARNING: 'podman rm -f' failed for some of: $ids"
    fi
fi

# ---------------------------------------------------------------- dockerd
if pid=$(pid_alive "$PIDFILE" dockerd); then
    [ -x "$DOCKER" ] && remove_labelled "$DOCKER"
    # dockerd stops its other containers and its managed containerd on the way down.
    stop_pid "$pid" dockerd
    rm -f "$PIDFILE"
else
    rm -f "$PIDFILE" # stale or absent
fi

# The containerd that dockerd started (its pid file is under our exec root): normally gone with
# dockerd; left over only if dockerd had to be SIGKILLed.
if cpid=$(pid_alive "$D/exec/containerd/containerd.pid" containerd); then
    stop_pid "$cpid" "containerd (started by our dockerd)"
fi
rm -f "$D/exec/containerd/containerd.pid"

# Containers left running by a dockerd that had to be SIGKILLed (their containerd-shim and
# process outlive it): delete them with runc under dockerd's own runc root (only this state dir's
# containers), then stop each one's shim: the parent of the container's init (init.pid).
RUNC_ROOT=$D/exec/runtime-runc/moby
TASKS=$D/exec/containerd/daemon/io.containerd.runtime.v2.task/moby
if ! pid_alive "$PIDFILE" dockerd >/dev/null && [ -d "$RUNC_ROOT" ] && command -v runc >/dev/null 2>&1; then
    for id in $(runc --root "$RUNC_ROOT" list -q 2>/dev/null); do
        shim=""
        if ipid=$(tr -dc '0-9' <"$TASKS/$id/init.pid" 2>/dev/null) && [ -n "$ipid" ]; then
            shim=$(awk '/^PPid:/ { print $2 }' "/proc/$ipid/status" 2>/dev/null || true)
            [ -n "$shim" ] && [ "$(cat "/proc/$shim/comm" 2>/dev/null)" = containerd-shim ] || shim=""
        fi
        log "deleting leftover docker container $id (runc delete --force)"
        runc --root "$RUNC_ROOT" delete --force "$id" 2>/dev/null || log "WARNING: runc delete $id failed"
        [ -z "$shim" ] || stop_pid "$shim" "containerd-shim of $id"
    done
fi

# With dockerd gone, mounts that it left under its dirs: always the bind mount of the host's
# network namespace at docker/exec/netns/default (it does not unmount it on shutdown), and after
# a SIGKILL also container rootfs mounts. Unmount them, deepest first, so the state dir can be
# deleted. Only paths under STATE_DIR/docker/, and only when no dockerd runs for it.
if ! pid_alive "$PIDFILE" dockerd >/dev/null; then
    awk -v prefix="$D/" 'index($5, prefix) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "WARNING: cannot unmount $m"
        done
fi
