#!/usr/bin/env bash
# Starts a real Docker engine (dockerd 20.10, own socket, no bridge network) and configures rootful
# podman (4.3) with its storage under STATE_DIR, then builds the test image
# localhost/testbot-busybox:1 in both engines if it is missing. Idempotent.
#
#   tests/containers/start.sh [STATE_DIR]      (default STATE_DIR: /var/tmp/testbot-containers)
#   eval "$(tests/containers/start.sh)"        (sets DOCKER_HOST, CONTAINERS_CONF,
#                                               CONTAINERS_STORAGE_CONF in the calling shell)
#
# Progress and errors go to stderr; stdout gets exactly three lines:
#   export DOCKER_HOST=unix://STATE_DIR/docker.sock
#   export CONTAINERS_CONF=STATE_DIR/containers.conf
#   export CONTAINERS_STORAGE_CONF=STATE_DIR/storage.conf
# Running it again while dockerd runs and the images exist is a fast no-op printing the same lines.
# Needs root and the packages from install.sh. Stop with stop.sh STATE_DIR.
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-containers}
WAIT_SECS=${TESTBOT_CONTAINERS_WAIT_SECS:-60}
IMAGE=localhost/testbot-busybox:1
# Bump when the image recipe below changes: start.sh rebuilds an image whose label differs.
RECIPE_VERSION=2

log() { echo "start.sh: $*" >&2; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (dockerd and rootful podman)"
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
case "$STATE_DIR" in *[[:space:]]* | *[\"\'\\]*)
    die "STATE_DIR must not contain whitespace or quotes: $STATE_DIR" ;;
esac
# Unix socket paths are limited to 107 bytes; the longest one is containerd's debug socket
# under the exec root (STATE_DIR/docker/exec/containerd/containerd-debug.sock).
[ "${#STATE_DIR}" -le 60 ] || die "STATE_DIR is too long for unix socket paths (max 60 chars): $STATE_DIR"
chmod 0755 "$STATE_DIR"

# One start.sh/stop.sh at a time per state dir (tests may call start.sh in parallel).
exec 9>"$STATE_DIR/lock"
flock -w 120 9 || die "another start.sh/stop.sh holds $STATE_DIR/lock for more than 120s"

# The docker client: Debian's /usr/bin/docker (20.10, the daemon's own version) unless
# TESTBOT_DOCKER says otherwise. The machine's /usr/local/bin/docker (28.x, first in PATH)
# negotiates down to API 1.41 and works too (see README).
DOCKER=${TESTBOT_DOCKER:-/usr/bin/docker}
DOCKERD=$(command -v dockerd || true)
PODMAN=$(command -v podman || true)
BUSYBOX=/bin/busybox
[ -x "$DOCKER" ] || die "$DOCKER not found: run tests/containers/install.sh first"
[ -n "$DOCKERD" ] || die "dockerd not found: run tests/containers/install.sh first"
[ -n "$PODMAN" ] || die "podman not found: run tests/containers/install.sh first"
command -v runc >/dev/null 2>&1 || die "runc not found: run tests/containers/install.sh first"
# The image needs the static busybox: a dynamic one would not run in an image without libc.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q '^install ok installed$' ||
    [ ! -x "$BUSYBOX" ]; then
    die "busybox-static is not installed: run tests/containers/install.sh first"
fi

D=$STATE_DIR/docker
SOCK=$STATE_DIR/docker.sock
PIDFILE=$D/dockerd.pid
DLOG=$D/dockerd.log
export DOCKER_HOST=unix://$SOCK
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
mkdir -p "$D/data" "$D/exec"
chmod 0711 "$D" "$D/data" "$D/exec"

# pid_alive PIDFILE COMM: prints the PID and succeeds when PIDFILE names a live process whose
# command name is COMM (guards against a stale pid file whose PID was reused).
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

# write_if_changed FILE CONTENT: (re)writes FILE only when its content differs; succeeds if written.
write_if_changed() {
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
    printf '%s\n' "$2" >"$1.tmp"
    chmod 0644 "$1.tmp"
    mv -f "$1.tmp" "$1"
}

# ---------------------------------------------------------------- dockerd
# Its own (empty) daemon.json, so that a machine's /etc/docker/daemon.json does not leak in.
write_if_changed "$D/daemon.json" '{}' || true

docker_ok() { timeout 10 "$DOCKER" info >/dev/null 2>&1; }

if pid=$(pid_alive "$PIDFILE" dockerd); then
    docker_ok || log "dockerd (pid $pid) runs but does not answer yet; waiting"
else
    log "starting dockerd (state in $D)"
    rm -f "$PIDFILE"
    # Flags: no bridge network, no iptables/forwarding/masquerading (nothing is routed off the
    # machine; containers get no network by default); nofile fixed because this sandbox cannot
    # raise rlimits (no CAP_SYS_RESOURCE). dockerd starts its own containerd under the exec root.
    setsid "$DOCKERD" \
        --config-file "$D/daemon.json" \
        --data-root "$D/data" \
        --exec-root "$D/exec" \
        --pidfile "$PIDFILE" \
        -H "unix://$SOCK" \
        --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --default-ulimit nofile=20000:20000 \
        </dev/null >>"$DLOG" 2>&1 9>&- &
    started_pid=$!
fi

# give_up MESSAGE: stops a dockerd that this run started (it would be left half-started
# otherwise), then dies with MESSAGE and the log tail.
give_up() {
    if [ -n "${started_pid:-}" ] && kill -0 "$started_pid" 2>/dev/null; then
        kill -TERM "$started_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$started_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$started_pid" 2>/dev/null || true
    fi
    die "$1; tail of $DLOG:
$(tail -n 30 "$DLOG" 2>&1)"
}

deadline=$((SECONDS + WAIT_SECS))
until docker_ok; do
    if [ -n "${started_pid:-}" ] && ! kill -0 "$started_pid" 2>/dev/null; then
        started_pid=""
        give_up "dockerd exited during startup"
    fi
    [ "$SECONDS" -lt "$deadline" ] ||
        give_up "dockerd did not answer 'docker info' within ${WAIT_SECS}s (stopped it again)"
    sleep 0.2
done
pid_alive "$PIDFILE" dockerd >/dev/null ||
    die "'docker info' answers on $SOCK but $PIDFILE names no live dockerd (another daemon on this socket?)"

# ---------------------------------------------------------------- podman config
P=$STATE_DIR/podman
mkdir -p "$P/storage" "$P/run" "$P/tmp"
chmod 0700 "$P/storage" "$P/run" "$P/tmp"
CONF=$STATE_DIR/containers.conf
SCONF=$STATE_DIR/storage.conf

# runc: crun refuses this VM's hybrid cgroup layout. cgroupfs: there is no systemd. netns none:
# jobs get no network by default. The ulimits are what this VM allows (no raising rlimits).
# No journald here: events and container logs go to files. --init uses tini-static (comes with
# docker.io; dockerd's --init uses it too) instead of catatonit, which is not installed.
if write_if_changed "$CONF" "# Written by tests/containers/start.sh: rootful podman for testbot's tests.
[containers]
netns = \"none\"
default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]
log_driver = \"k8s-file\"
init_path = \"/usr/bin/tini-static\"

[engine]
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
events_logger = \"file\"
events_logfile_path = \"$P/events.log\"
tmp_dir = \"$P/tmp\""; then
    log "wrote $CONF"
fi

if write_if_changed "$SCONF" "# Written by tests/containers/start.sh: podman's storage under the state dir.
[storage]
driver = \"overlay\"
graphroot = \"$P/storage\"
runroot = \"$P/run\""; then
    log "wrote $SCONF"
fi

export CONTAINERS_CONF=$CONF
export CONTAINERS_STORAGE_CONF=$SCONF

# ---------------------------------------------------------------- test image
# Recipe: busybox-static with all its applet links, /etc/passwd and /etc/group with root, nobody
# and testbot-job (the host account's uid/gid when it exists, else 995/994), /tmp 1777, /work 1777.
if JOB_UID=$(id -u testbot-job 2>/dev/null) && JOB_GID=$(id -g testbot-job 2>/dev/null); then :; else
    JOB_UID=995 JOB_GID=994
fi
PASSWD="root:x:0:0:root:/root:/bin/sh
testbot-job:x:$JOB_UID:$JOB_GID:testbot job:/work:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false"
GROUP="root:x:0:
testbot-job:x:$JOB_GID:
nogroup:x:65534:"
BB_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)
RECIPE=$(printf '%s\n' "$RECIPE_VERSION" "$BB_VERSION" "$PASSWD" "$GROUP" | sha256sum | cut -c1-16)

docker_image_recipe() {
    "$DOCKER" image inspect --format '{{index .Config.Labels "testbot.image.recipe"}}' "$IMAGE" 2>/dev/null || true
}
podman_image_recipe() {
    "$PODMAN" image inspect --format '{{index .Config.Labels "testbot.image.recipe"}}' "$IMAGE" 2>/dev/null || true
}
need_docker=0 need_podman=0
[ "$(docker_image_recipe)" = "$RECIPE" ] || need_docker=1
[ "$(podman_image_recipe)" = "$RECIPE" ] || need_podman=1

if [ "$need_docker" = 1 ] || [ "$need_podman" = 1 ]; then
    B=$STATE_DIR/image
    rm -rf "$B"
    mkdir -p "$B/rootfs"
    R=$B/rootfs
    (
        cd "$R"
        mkdir -p bin sbin usr/bin usr/sbin etc root work tmp proc sys dev var/tmp home
        cp /bin/busybox bin/busybox
        chmod 0755 bin/busybox
        for applet in $("$BUSYBOX" --list-full); do
            [ "$applet" = bin/busybox ] && continue
            mkdir -p "$(dirname "$applet")"
            # Absolute links, resolved inside the container's root. (Not `realpath --relative-to`:
            # that resolves the host's merged-/usr /bin -> usr/bin link and gets them wrong.)
            ln -sf /bin/busybox "$applet"
        done
        printf '%s\n' "$PASSWD" >etc/passwd
        printf '%s\n' "$GROUP" >etc/group
        chmod 0644 etc/passwd etc/group
        chmod 0700 root
        chmod 1777 tmp var/tmp work
    )
    [ -L "$R/bin/sh" ] || die "image build: no /bin/sh applet link"
    tar --numeric-owner --owner=0 --group=0 -C "$R" -cf "$B/rootfs.tar" .
    changes=(--change 'CMD ["/bin/sh"]' --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin'
        --change "LABEL testbot.image.recipe=$RECIPE")
    # An image of an older recipe is untagged by the import: remove it (unless a container
    # still uses it), so that rebuilds leave no <none> images behind.
    if [ "$need_docker" = 1 ]; then
        log "building $IMAGE in docker"
        old_id=$("$DOCKER" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
        out=$("$DOCKER" import "${changes[@]}" "$B/rootfs.tar" "$IMAGE" 2>&1) ||
            die "docker import failed: $out"
        [ -z "$old_id" ] || "$DOCKER" rmi "$old_id" >/dev/null 2>&1 || true
    fi
    if [ "$need_podman" = 1 ]; then
        log "building $IMAGE in podman"
        old_id=$("$PODMAN" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
        out=$("$PODMAN" import "${changes[@]}" "$B/rootfs.tar" "$IMAGE" 2>&1) ||
            die "podman import failed: $out"
        [ -z "$old_id" ] || "$PODMAN" rmi "$old_id" >/dev/null 2>&1 || true
    fi
    rm -rf "$B"
    [ "$(docker_image_recipe)" = "$RECIPE" ] || die "docker: $IMAGE missing after import"
    [ "$(podman_image_recipe)" = "$RECIPE" ] || die "podman: $IMAGE missing after import"
fi

echo "export DOCKER_HOST=unix://$SOCK"
echo "export CONTAINERS_CONF=$CONF"
echo "export CONTAINERS_STORAGE_CONF=$SCONF"
