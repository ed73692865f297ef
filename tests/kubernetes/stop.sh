#!/usr/bin/env bash
# Stops the single-node Kubernetes that start.sh started for STATE_DIR and cleans up after it:
#   1. the kubelet, by the PID in its pid file (never by process name): SIGTERM, wait, SIGKILL;
#   2. the containers it created in the Docker engine (names k8s_*), if the engine still answers
#      (DOCKER_HOST, else the one start.sh recorded). A stopped engine took its containers with it;
#   3. the mounts it left under STATE_DIR (tmpfs of secret/projected volumes), deepest first;
#   4. kube-scheduler, kube-controller-manager and kube-apiserver (together), then etcd, by PID;
#   5. what the kubelet keeps at fixed paths (1.20): the pods' log links under /var/log/pods and
#      /var/log/containers, and /var/lib/kubelet/device-plugins;
#   6. etcd's data and the kubelet's dir: the next start.sh gives a fresh, empty cluster.
# Certificates, tokens, kubeconfigs and logs are kept (so a restart is fast and the kubeconfigs
# stay valid). Delete STATE_DIR after stop.sh to start from scratch. Idempotent: nothing running
# is not an error.
#
#   tests/kubernetes/stop.sh [STATE_DIR]      (default STATE_DIR: /var/tmp/testbot-kubernetes)
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-kubernetes}
TERM_SECS=${TESTBOT_KUBERNETES_STOP_SECS:-20}
DOCKER=${TESTBOT_DOCKER:-/usr/bin/docker}

log() { echo "stop.sh: $*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root"; exit 1; }
[ -d "$STATE_DIR" ] || exit 0
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
# start.sh calls stop.sh while it holds the lock itself (TESTBOT_KUBERNETES_LOCK_HELD=1).
if [ "${TESTBOT_KUBERNETES_LOCK_HELD:-0}" != 1 ]; then
    exec 9>"$STATE_DIR/lock"
    flock -w 300 9 || { log "another start.sh/stop.sh holds $STATE_DIR/lock for more than 300s"; exit 1; }
fi
RUN=$STATE_DIR/run
KUBELET_DIR=$STATE_DIR/kubelet

# pid_alive PIDFILE COMM: prints the PID when PIDFILE names a live process called COMM.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

# any_alive PID...: succeeds while at least one of the PIDs exists.
any_alive() {
    local p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}

# stop_components NAME=COMM...: SIGTERM to the PIDs in RUN/NAME.pid (those that name a live
# process called COMM), all at once; waits up to TERM_SECS for them to exit, then SIGKILL. Removes
# the pid files of those that are gone (and stale ones).
stop_components() {
    local arg name comm pid i pids=() names=()
    for arg in "$@"; do
        name=${arg%%=*} comm=${arg#*=}
        if pid=$(pid_alive "$RUN/$name.pid" "$comm"); then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid") names+=("$name")
        else
            rm -f "$RUN/$name.pid" # stale or absent
        fi
    done
    [ "${#pids[@]}" -gt 0 ] || return 0
    for ((i = 0; i < TERM_SECS * 10; i++)); do
        any_alive "${pids[@]}" || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null || continue
        log "${names[$i]} (pid ${pids[$i]}) still running after ${TERM_SECS}s: SIGKILL"
        kill -KILL "${pids[$i]}" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        any_alive "${pids[@]}" || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            log "WARNING: ${names[$i]} (pid ${pids[$i]}) survived SIGKILL"
        else
            rm -f "$RUN/${names[$i]}.pid"
        fi
    done
}

rm -f "$RUN/ready"

# ---------------------------------------------------------------- kubelet and its containers
stop_components kubelet=kubelet

docker_host=${DOCKER_HOST:-$(cat "$RUN/docker_host" 2>/dev/null || true)}
if [ -n "$docker_host" ] && [ -x "$DOCKER" ] &&
    DOCKER_HOST=$docker_host timeout 10 "$DOCKER" info >/dev/null 2>&1; then
    # The kubelet names its containers k8s_CONTAINER_POD_NAMESPACE_UID_N (k8s_POD_... for pod
    # sandboxes). Only one such cluster can run on a machine (fixed ports), so all are ours.
    ids=$(DOCKER_HOST=$docker_host timeout 30 "$DOCKER" ps -a --format '{{.ID}} {{.Names}}' 2>/dev/null |
        awk '$2 ~ /^k8s_/ { print $1 }' || true)
    if [ -n "$ids" ]; then
        log "removing the kubelet's containers: $(wc -w <<<"$ids")"
        # shellcheck disable=SC2086 # one id a word
        DOCKER_HOST=$docker_host timeout 60 "$DOCKER" rm -f $ids >/dev/null 2>&1 ||
            log "WARNING: 'docker rm -f' failed for some of: $(tr '\n' ' ' <<<"$ids")"
    fi
fi

# Mounts the kubelet left under STATE_DIR (secret/projected/emptyDir-memory tmpfs), deepest first.
# Only when the kubelet is gone.
if ! pid_alive "$RUN/kubelet.pid" kubelet >/dev/null; then
    awk -v prefix="$STATE_DIR/" 'index($2, prefix) == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r m; do
            m=$(printf '%b' "$m") # /proc/self/mounts escapes spaces etc. as \040
            umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "WARNING: cannot unmount $m"
        done
fi

# ---------------------------------------------------------------- control plane
# The three together, then etcd (the API server's store) last.
stop_components kube-scheduler=kube-scheduler kube-controller-manager=kube-controller \
    kube-apiserver=kube-apiserver
stop_components etcd=etcd

# ---------------------------------------------------------------- files outside STATE_DIR
# The kubelet 1.20 keeps pod log links at fixed paths: /var/log/pods/NAMESPACE_POD_UID/ and
# /var/log/containers/POD_NAMESPACE_CONTAINER-ID.log. Remove what this cluster added: the entries
# that were not there when start.sh started it (RUN/var-log-before), or, without that list, those
# of the pod UIDs under kubelet/pods. Only when the kubelet is gone.
if ! pid_alive "$RUN/kubelet.pid" kubelet >/dev/null; then
    before=$RUN/var-log-before
    for d in /var/log/pods /var/log/containers; do
        [ -d "$d" ] || continue
        for e in "$d"/* "$d"/.[!.]*; do
            [ -e "$e" ] || [ -L "$e" ] || continue
            name=${e##*/}
            if [ -f "$before" ]; then
                grep -qxF -- "$name" "$before" && continue
            else
                uid=${name##*_}
                if [ "$d" != /var/log/pods ] || [ -z "$uid" ] || [ ! -d "$KUBELET_DIR/pods/$uid" ]; then continue; fi
            fi
            rm -rf -- "$e"
        done
        # Directories the kubelet created: removed once empty.
        if [ ! -f "$before" ] || grep -qxF "$d: absent" "$before"; then rmdir "$d" 2>/dev/null || true; fi
    done
    # Links left pointing to removed pod log dirs.
    if [ -d /var/log/containers ]; then
        find /var/log/containers -maxdepth 1 -type l -lname '/var/log/pods/*' ! -exec test -e {} \; -delete 2>/dev/null || true
    fi
    rm -f "$before"
fi
# The device manager's socket dir is fixed too (/var/lib/kubelet/device-plugins, whatever
# --root-dir says). No other kubelet can run here while ours does (same ports).
if ! pid_alive "$RUN/kubelet.pid" kubelet >/dev/null && [ -d /var/lib/kubelet/device-plugins ]; then
    rm -f /var/lib/kubelet/device-plugins/kubelet.sock /var/lib/kubelet/device-plugins/DEPRECATION \
        /var/lib/kubelet/device-plugins/kubelet_internal_checkpoint
    rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null || true
fi

# ---------------------------------------------------------------- fresh state for the next start
# Only when nothing runs and nothing is mounted there any more (never remove through a mount).
if ! pid_alive "$RUN/kubelet.pid" kubelet >/dev/null && ! pid_alive "$RUN/etcd.pid" etcd >/dev/null; then
    for d in "$STATE_DIR/etcd" "$KUBELET_DIR" "$STATE_DIR/dockershim" "$STATE_DIR/volume-plugins"; do
        [ -e "$d" ] || continue
        if awk -v d="$d" '$2 == d || index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
            log "WARNING: $d still has mounts; not removing it"
        else
            rm -rf --one-file-system "$d"
        fi
    done
    rm -f "$STATE_DIR/dockershim.sock"
fi
