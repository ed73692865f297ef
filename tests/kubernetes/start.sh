#!/usr/bin/env bash
# Starts a real single-node Kubernetes 1.20.2 on loopback (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, and a kubelet on the Docker engine of
# tests/containers/start.sh), waits for the node `localhost` to be Ready, and sets up the
# namespace, service account, RBAC and kubeconfigs a CI agent uses. Idempotent.
#
#   eval "$(tests/containers/start.sh)"       (first: the Docker engine, DOCKER_HOST)
#   tests/kubernetes/start.sh [STATE_DIR]     (default STATE_DIR: /var/tmp/testbot-kubernetes)
#   eval "$(tests/kubernetes/start.sh)"       (sets the three variables below in the calling shell)
#
# Progress and errors go to stderr; stdout gets exactly three lines:
#   export KUBECONFIG=STATE_DIR/admin.kubeconfig                (system:masters)
#   export TESTBOT_KUBE_AGENT_CONFIG=STATE_DIR/agent.kubeconfig  (user testbot-agent)
#   export TESTBOT_KUBE_NAMESPACE=testbot-jobs
# Running it again while everything runs is a fast no-op printing the same lines. Starting from a
# stopped (or half-running) state gives a fresh, empty cluster; certificates and tokens are kept.
# Needs root, DOCKER_HOST, and the binaries from install.sh. Stop with stop.sh STATE_DIR.
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-kubernetes}
CACHE_DIR=${TESTBOT_KUBERNETES_CACHE_DIR:-/var/cache/testbot-kubernetes}
WAIT_SECS=${TESTBOT_KUBERNETES_WAIT_SECS:-120}
# klog verbosity (--v) of the Kubernetes components: 0 is quiet; 4 shows every kubelet decision.
LOG_V=${TESTBOT_KUBERNETES_LOG_V:-0}
DOCKER=${TESTBOT_DOCKER:-/usr/bin/docker}
KUBE_VERSION=v1.20.2
NAMESPACE=testbot-jobs
PAUSE_IMAGE=localhost/pause:3.4.1
# Loopback ports. etcd avoids its default 2379/2380 (a system etcd may use those).
ETCD_PORT=23790
ETCD_PEER_PORT=23800
API_PORT=6443
CM_PORT=10257
SCHED_PORT=10259
KUBELET_PORT=10250
KUBELET_HEALTHZ_PORT=10248
# Job.spec.ttlSecondsAfterFinished is alpha (off) in 1.20 and GA from 1.23: on, the API server
# keeps the field and the controller-manager runs the ttl-after-finished controller, as on any
# current cluster. (Off, the API server drops the field silently.)
FEATURE_GATES=TTLAfterFinished=true
# Bump when what the certificates contain changes: start.sh then makes new ones.
PKI_VERSION=1

log() { echo "start.sh: $*" >&2; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (the kubelet manages containers and mounts)"
HERE=$(cd "$(dirname "$0")" && pwd -P)
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
case "$STATE_DIR" in *[[:space:]]* | *[\"\'\\]*)
    die "STATE_DIR must not contain whitespace or quotes: $STATE_DIR" ;;
esac
# Unix socket paths are limited to 107 bytes: the kubelet's sockets live under STATE_DIR
# (kubelet/pod-resources/kubelet.sock, kubelet/plugins_registry/..., dockershim.sock).
[ "${#STATE_DIR}" -le 60 ] || die "STATE_DIR is too long for unix socket paths (max 60 chars): $STATE_DIR"
chmod 0755 "$STATE_DIR"

# One start.sh/stop.sh at a time per state dir.
exec 9>"$STATE_DIR/lock"
flock -w 300 9 || die "another start.sh/stop.sh holds $STATE_DIR/lock for more than 300s"

# ---------------------------------------------------------------- prerequisites
BIN=$CACHE_DIR/$KUBE_VERSION/bin
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet pause kubectl; do
    [ -x "$BIN/$b" ] || die "$BIN/$b not found: run tests/kubernetes/install.sh first"
done
# Binaries of an older recipe (install.sh's RECIPE_VERSION changed since they were built).
recipe=$(sed -n 's/^RECIPE_VERSION=\([0-9]*\)$/\1/p' "$HERE/install.sh")
[ "$(head -n 1 "$CACHE_DIR/$KUBE_VERSION/stamp" 2>/dev/null)" = "testbot-kubernetes recipe $recipe $KUBE_VERSION" ] ||
    die "the binaries in $BIN are not of install.sh's current recipe ($recipe): run tests/kubernetes/install.sh"
ETCD=$(command -v etcd || true)
[ -n "$ETCD" ] || die "etcd not found: run tests/kubernetes/install.sh first"
for cmd in openssl curl flock setsid; do
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd not found: run tests/kubernetes/install.sh first"
done
[ -x "$DOCKER" ] || die "$DOCKER not found: run tests/containers/install.sh first"
KUBECTL=$BIN/kubectl

[ -n "${DOCKER_HOST:-}" ] || die "DOCKER_HOST is not set. The kubelet runs pods in the Docker engine of
tests/containers/start.sh: run   eval \"\$(tests/containers/start.sh)\"   first"
case "$DOCKER_HOST" in unix://*) ;; *) die "DOCKER_HOST must be a unix:// socket (got $DOCKER_HOST)" ;; esac
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
timeout 10 "$DOCKER" info >/dev/null 2>&1 || die "the Docker engine at DOCKER_HOST=$DOCKER_HOST does not
answer. Start it with   eval \"\$(tests/containers/start.sh)\"   first"
# Nothing here may go through a proxy (all traffic stays on loopback).
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY

PKI=$STATE_DIR/pki
CONF=$STATE_DIR/conf
RUN=$STATE_DIR/run
LOGS=$STATE_DIR/logs
mkdir -p "$PKI" "$CONF" "$RUN" "$LOGS"
chmod 0700 "$PKI" "$CONF"
ADMIN_KUBECONFIG=$STATE_DIR/admin.kubeconfig
AGENT_KUBECONFIG=$STATE_DIR/agent.kubeconfig

# The components, in start order. Each has a pid file RUN/NAME.pid; comm_of gives its
# /proc/PID/comm (at most 15 characters).
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet)
comm_of() { case "$1" in kube-controller-manager) echo kube-controller ;; *) echo "$1" ;; esac; }

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
alive() { pid_alive "$RUN/$1.pid" "$(comm_of "$1")" >/dev/null; }

# write_if_changed FILE CONTENT [MODE]: (re)writes FILE only when its content differs.
write_if_changed() {
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
    printf '%s\n' "$2" >"$1.tmp"
    chmod "${3:-0644}" "$1.tmp"
    mv -f "$1.tmp" "$1"
}

kadmin() { "$KUBECTL" --kubeconfig "$ADMIN_KUBECONFIG" --request-timeout=10s "$@"; }

print_exports() {
    echo "export KUBECONFIG=$ADMIN_KUBECONFIG"
    echo "export TESTBOT_KUBE_AGENT_CONFIG=$AGENT_KUBECONFIG"
    echo "export TESTBOT_KUBE_NAMESPACE=$NAMESPACE"
    echo "export TESTBOT_KUBECTL=$KUBECTL"
}

# ---------------------------------------------------------------- already running?
healthy() {
    kadmin get --raw /readyz >/dev/null 2>&1 &&
        [ "$(kadmin get node localhost -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] &&
        kadmin -n "$NAMESPACE" get serviceaccount testbot-job >/dev/null 2>&1
}
n_alive=0
for c in "${COMPONENTS[@]}"; do alive "$c" && n_alive=$((n_alive + 1)); done
if [ "$n_alive" = "${#COMPONENTS[@]}" ] && [ -f "$RUN/ready" ] &&
    [ "$(cat "$RUN/docker_host" 2>/dev/null)" = "$DOCKER_HOST" ]; then
    # All up (a no-op, normally). A passing hiccup (node briefly NotReady) is waited out rather
    # than answered with a new cluster, which would throw away the jobs of tests running now.
    deadline=$((SECONDS + WAIT_SECS))
    until healthy; do
        [ "$SECONDS" -lt "$deadline" ] || die "the cluster runs but is not healthy after ${WAIT_SECS}s
(API server /readyz, node localhost Ready, service account $NAMESPACE/testbot-job). Restart it:
tests/kubernetes/stop.sh $STATE_DIR; logs in $LOGS"
        sleep 0.5
    done
    print_exports
    exit 0
fi

# Otherwise stop what is left (containers, mounts, processes) and start afresh: stop.sh wipes
# etcd's data and the kubelet's dir, so this is a new, empty cluster.
if [ "$n_alive" -gt 0 ]; then
    log "the cluster runs only partly ($n_alive of ${#COMPONENTS[@]} components up) or on another Docker engine: restarting it"
fi
TESTBOT_KUBERNETES_LOCK_HELD=1 "$HERE/stop.sh" "$STATE_DIR" ||
    die "stop.sh failed to clean up $STATE_DIR"

# Ports held by anything else (another cluster, a system etcd or kubelet): say so.
for port in $ETCD_PORT $ETCD_PEER_PORT $API_PORT $CM_PORT $SCHED_PORT $KUBELET_PORT $KUBELET_HEALTHZ_PORT; do
    command -v ss >/dev/null 2>&1 || break
    line=$(ss -Hltnp "sport = :$port" 2>/dev/null | head -n 1 || true)
    [ -z "$line" ] || die "port $port is already in use (another Kubernetes or etcd? stop it first): $line"
done

START=$SECONDS
# The Docker engine the kubelet uses, for stop.sh (which may run without DOCKER_HOST).
echo "$DOCKER_HOST" >"$RUN/docker_host"
# The kubelet 1.20 writes pod log links to fixed paths: remember what is there already, so that
# stop.sh removes only what this cluster added.
for d in /var/log/pods /var/log/containers; do
    if [ -d "$d" ]; then ls -A "$d"; else echo "$d: absent"; fi
done >"$RUN/var-log-before"
rm -f "$RUN/ready"

# ---------------------------------------------------------------- pause image
# The pod sandbox image: the static pause binary alone. No registry can be reached.
PAUSE_RECIPE=$(sha256sum "$BIN/pause" | cut -c1-16)
if [ "$("$DOCKER" image inspect --format '{{index .Config.Labels "testbot.image.recipe"}}' "$PAUSE_IMAGE" 2>/dev/null || true)" != "$PAUSE_RECIPE" ]; then
    log "importing $PAUSE_IMAGE into the Docker engine"
    B=$STATE_DIR/pause-image
    rm -rf "$B"
    mkdir -p "$B/rootfs"
    install -m 0755 "$BIN/pause" "$B/rootfs/pause"
    tar --numeric-owner --owner=0 --group=0 -C "$B/rootfs" -cf "$B/rootfs.tar" .
    old_id=$("$DOCKER" image inspect --format '{{.Id}}' "$PAUSE_IMAGE" 2>/dev/null || true)
    out=$("$DOCKER" import --change 'ENTRYPOINT ["/pause"]' \
        --change "LABEL testbot.image.recipe=$PAUSE_RECIPE" "$B/rootfs.tar" "$PAUSE_IMAGE" 2>&1) ||
        die "docker import of $PAUSE_IMAGE failed: $out"
    [ -z "$old_id" ] || "$DOCKER" rmi "$old_id" >/dev/null 2>&1 || true
    rm -rf "$B"
fi

# ---------------------------------------------------------------- certificates and tokens
# A throwaway CA and certificates, made once and kept (stop.sh keeps them): RSA 2048, 10 years.
if [ "$(cat "$PKI/version" 2>/dev/null)" != "$PKI_VERSION" ] || [ ! -s "$PKI/ca.crt" ] || [ ! -s "$PKI/ca.key" ]; then
    log "creating a CA and certificates in $PKI"
    find "$PKI" -mindepth 1 -delete
    cat >"$PKI/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
EOF
    (umask 077 && openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
        -config "$PKI/openssl.cnf" -extensions v3_ca -subj "/CN=testbot-kubernetes-ca" \
        -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>"$PKI/openssl.log") ||
        die "openssl: CA: $(cat "$PKI/openssl.log")"
    # The service-account token signing key pair.
    (umask 077 && openssl genrsa -out "$PKI/sa.key" 2048 2>"$PKI/openssl.log" &&
        openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>"$PKI/openssl.log") ||
        die "openssl: service-account key: $(cat "$PKI/openssl.log")"
fi

# cert NAME SUBJECT USAGE [SAN]: a key and a certificate signed by the CA, unless they exist.
# USAGE: serverAuth or clientAuth.
cert() {
    local name=$1 subj=$2 usage=$3 san=${4:-}
    [ -s "$PKI/$name.crt" ] && [ -s "$PKI/$name.key" ] && return 0
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature, keyEncipherment"
        echo "extendedKeyUsage = $usage"
        echo "subjectKeyIdentifier = hash"
        echo "authorityKeyIdentifier = keyid"
        [ -z "$san" ] || echo "subjectAltName = $san"
    } >"$PKI/$name.ext"
    (umask 077 && openssl req -new -newkey rsa:2048 -nodes -sha256 -config "$PKI/openssl.cnf" \
        -subj "$subj" -keyout "$PKI/$name.key" -out "$PKI/$name.csr" 2>"$PKI/openssl.log" &&
        openssl x509 -req -sha256 -days 3650 -in "$PKI/$name.csr" -CA "$PKI/ca.crt" \
            -CAkey "$PKI/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
            -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>"$PKI/openssl.log") ||
        die "openssl: certificate $name: $(cat "$PKI/openssl.log")"
    rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}
cert apiserver "/CN=kube-apiserver" serverAuth \
    "DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local, IP:127.0.0.1, IP:10.0.0.1"
# The API server's client certificate towards the kubelet (logs, exec): without it pod logs
# answer 401. system:masters, so the kubelet's webhook authorization allows it.
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
cert kubelet "/CN=localhost" serverAuth "DNS:localhost, IP:127.0.0.1"
cert kubelet-client "/O=system:nodes/CN=system:node:localhost" clientAuth
cert controller-manager "/CN=system:kube-controller-manager" clientAuth
cert scheduler "/CN=system:kube-scheduler" clientAuth
echo "$PKI_VERSION" >"$PKI/version"

# Static tokens (--token-auth-file): the admin (system:masters) and the CI agent (no group: only
# the Role below). Made once and kept.
if [ ! -s "$PKI/tokens.csv" ]; then
    (umask 077 && printf '%s,testbot-admin,testbot-admin,"system:masters"\n%s,testbot-agent,testbot-agent\n' \
        "$(openssl rand -hex 32)" "$(openssl rand -hex 32)" >"$PKI/tokens.csv")
fi
ADMIN_TOKEN=$(awk -F, '$2 == "testbot-admin" { print $1 }' "$PKI/tokens.csv")
AGENT_TOKEN=$(awk -F, '$2 == "testbot-agent" { print $1 }' "$PKI/tokens.csv")
if [ -z "$ADMIN_TOKEN" ] || [ -z "$AGENT_TOKEN" ]; then
    die "$PKI/tokens.csv lacks a token; delete it and retry"
fi

# ---------------------------------------------------------------- kubeconfigs
CA_DATA=$(base64 -w0 "$PKI/ca.crt")
SERVER=https://127.0.0.1:$API_PORT
# kubeconfig NAME USER AUTH-LINES [NAMESPACE]
kubeconfig() {
    cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: testbot
  cluster:
    server: $SERVER
    certificate-authority-data: $CA_DATA
users:
- name: $2
  user:
$3
contexts:
- name: $1
  context:
    cluster: testbot
    user: $2${4:+
    namespace: $4}
current-context: $1
EOF
}
cert_auth() { printf '    client-certificate: %s\n    client-key: %s' "$PKI/$1.crt" "$PKI/$1.key"; }
write_if_changed "$ADMIN_KUBECONFIG" "$(kubeconfig testbot-admin testbot-admin "    token: $ADMIN_TOKEN")" 0600 || true
write_if_changed "$AGENT_KUBECONFIG" "$(kubeconfig testbot-agent testbot-agent "    token: $AGENT_TOKEN" "$NAMESPACE")" 0600 || true
write_if_changed "$CONF/controller-manager.kubeconfig" "$(kubeconfig cm system:kube-controller-manager "$(cert_auth controller-manager)")" 0600 || true
write_if_changed "$CONF/scheduler.kubeconfig" "$(kubeconfig scheduler system:kube-scheduler "$(cert_auth scheduler)")" 0600 || true
write_if_changed "$CONF/kubelet.kubeconfig" "$(kubeconfig kubelet system:node:localhost "$(cert_auth kubelet-client)")" 0600 || true

# ---------------------------------------------------------------- kubelet config
KUBELET_DIR=$STATE_DIR/kubelet
write_if_changed "$CONF/kubelet.yaml" "# Written by tests/kubernetes/start.sh.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
rotateCertificates: false
serverTLSBootstrap: false
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $PKI/ca.crt
authorization:
  mode: Webhook
# No systemd, and a CI container cannot manage the QoS cgroup tree.
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
# Pods get no DNS config from the host.
resolvConf: \"\"
clusterDomain: cluster.local
# No evictions, and the image GC never deletes the local-only images.
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# No negative oom_score_adj without CAP_SYS_RESOURCE.
oomScoreAdj: 0
# The node turns Ready at the first status update after the kubelet is up: check every 2 s, not
# every 10 s (it posts only when something changed).
nodeStatusUpdateFrequency: 2s
# Not /usr/libexec/kubernetes/kubelet-plugins/volume/exec (created if missing).
volumePluginDir: $STATE_DIR/volume-plugins
serializeImagePulls: false" || true

# ---------------------------------------------------------------- start the components
# Each runs detached (setsid), stdin closed, its output in LOGS/NAME.log (the previous run's log
# is kept as NAME.log.prev).
launch() { # NAME ENV... -- ARGS...
    local name=$1 envs=()
    shift
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    [ -f "$LOGS/$name.log" ] && mv -f "$LOGS/$name.log" "$LOGS/$name.log.prev"
    env "${envs[@]}" setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 9>&- &
    echo $! >"$RUN/$name.pid"
}

logtail() { # of the components this run started
    local c
    for c in "${COMPONENTS[@]}"; do
        [ -f "$RUN/$c.pid" ] || continue
        echo "---- tail of $LOGS/$c.log:"
        tail -n 15 "$LOGS/$c.log" 2>/dev/null || echo "(missing)"
    done
}

# give_up MESSAGE: prints the log tails, stops everything this run started, and dies.
give_up() {
    local tails
    tails=$(logtail)
    TESTBOT_KUBERNETES_LOCK_HELD=1 "$HERE/stop.sh" "$STATE_DIR" >/dev/null 2>&1 || true
    die "$1 (stopped the cluster again; logs in $LOGS)
$tails"
}

# running PID: the process exists and is not a zombie (the components are this shell's children
# until it exits, so one that died stays a zombie until then).
running() {
    local state
    state=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) && [ -n "$state" ] && [ "$state" != Z ]
}

deadline=$((SECONDS + WAIT_SECS))
# wait_for WHAT COMMAND...: until COMMAND succeeds; gives up if a component died or on timeout.
wait_for() {
    local what=$1 c
    shift
    until "$@" >/dev/null 2>&1; do
        for c in "${COMPONENTS[@]}"; do
            if [ -s "$RUN/$c.pid" ] && ! running "$(cat "$RUN/$c.pid")"; then
                give_up "$c exited while waiting for $what"
            fi
        done
        [ "$SECONDS" -lt "$deadline" ] ||
            give_up "timed out after ${WAIT_SECS}s waiting for $what (TESTBOT_KUBERNETES_WAIT_SECS)"
        sleep 0.2
    done
}

log "starting etcd (127.0.0.1:$ETCD_PORT)"
launch etcd -- "$ETCD" --name testbot --data-dir "$STATE_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "testbot=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state new \
    --logger zap --log-outputs stderr
wait_for "etcd" curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"

log "starting kube-apiserver (https://127.0.0.1:$API_PORT)"
launch kube-apiserver -- "$BIN/kube-apiserver" --v="$LOG_V" \
    --advertise-address=127.0.0.1 --bind-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" --token-auth-file="$PKI/tokens.csv" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$PKI/ca.crt" \
    --kubelet-preferred-address-types=Hostname \
    --allow-privileged=false --profiling=false --cert-dir="$STATE_DIR/apiserver" \
    --feature-gates="$FEATURE_GATES"

# The kubelet retries until the API server answers: start it right away (it takes a few seconds
# to initialise).
log "starting kubelet (node localhost)"
# AWS_EC2_METADATA_DISABLED: the kubelet's in-tree AWS credential provider would otherwise try to
# reach the link-local cloud metadata address. The node is called `localhost`: the API server
# reaches it by that name (--kubelet-preferred-address-types=Hostname) without any DNS lookup.
# No --node-ip: the kubelet refuses a loopback node IP, and then publishes no address at all (not
# even the Hostname one), and pod logs fail with "no preferred addresses found".
launch kubelet AWS_EC2_METADATA_DISABLED=true -- "$BIN/kubelet" --v="$LOG_V" \
    --config="$CONF/kubelet.yaml" --kubeconfig="$CONF/kubelet.kubeconfig" \
    --root-dir="$KUBELET_DIR" --cert-dir="$KUBELET_DIR/pki" \
    --container-runtime=docker --docker-endpoint="$DOCKER_HOST" \
    --container-runtime-endpoint="unix://$STATE_DIR/dockershim.sock" \
    --experimental-dockershim-root-directory="$STATE_DIR/dockershim" \
    --seccomp-profile-root="$KUBELET_DIR/seccomp" \
    --pod-infra-container-image="$PAUSE_IMAGE" \
    --hostname-override=localhost

wait_for "the API server (/readyz)" kadmin get --raw /readyz

# The controller-manager and the scheduler only once the API server is ready: they exit if they
# cannot read their authentication config, which they may not until RBAC is bootstrapped.
log "starting kube-controller-manager and kube-scheduler"
launch kube-controller-manager -- "$BIN/kube-controller-manager" --v="$LOG_V" \
    --kubeconfig="$CONF/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$CONF/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$CONF/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$CM_PORT" --port=0 --leader-elect=false \
    --controllers='*,-nodeipam,-service,-route,-cloud-node-lifecycle' \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --flex-volume-plugin-dir="$STATE_DIR/volume-plugins" \
    --feature-gates="$FEATURE_GATES" \
    --profiling=false
launch kube-scheduler -- "$BIN/kube-scheduler" --v="$LOG_V" \
    --kubeconfig="$CONF/scheduler.kubeconfig" \
    --authentication-kubeconfig="$CONF/scheduler.kubeconfig" \
    --authorization-kubeconfig="$CONF/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 --leader-elect=false \
    --profiling=false

# ---------------------------------------------------------------- namespace, identities, RBAC
log "applying the namespace $NAMESPACE, service accounts testbot-job and testbot-agent, and the testbot-agent role"
SETUP="# Written by tests/kubernetes/start.sh.
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
---
# The identity job pods run under. It has no permissions, and no API token is mounted unless a
# pod asks for one.
apiVersion: v1
kind: ServiceAccount
metadata:
  name: testbot-job
  namespace: $NAMESPACE
automountServiceAccountToken: false
---
# The identity of an agent that runs inside the cluster, in a pod (in-cluster configuration).
apiVersion: v1
kind: ServiceAccount
metadata:
  name: testbot-agent
  namespace: $NAMESPACE
---
# What the CI agent (user testbot-agent, or service account testbot-agent in a pod) may do: run Jobs and watch them, in this namespace only.
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: testbot-agent
  namespace: $NAMESPACE
rules:
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, delete]
- apiGroups: [\"\"]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [\"\"]
  resources: [pods/log]
  verbs: [get]
# A job's result files are fetched from its pod by exec (get: WebSocket, create: SPDY and
# Kubernetes 1.30 on).
- apiGroups: [\"\"]
  resources: [pods/exec]
  verbs: [get, create]
- apiGroups: [\"\", events.k8s.io]
  resources: [events]
  verbs: [get, list, watch]
# A job's secret variables go into a Secret owned by its Job, never into the pod spec.
- apiGroups: [\"\"]
  resources: [secrets]
  verbs: [create, patch, delete, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: testbot-agent
  namespace: $NAMESPACE
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: testbot-agent
subjects:
- apiGroup: rbac.authorization.k8s.io
  kind: User
  name: testbot-agent
- kind: ServiceAccount
  name: testbot-agent
  namespace: $NAMESPACE"
write_if_changed "$CONF/setup.yaml" "$SETUP" || true
wait_for "kubectl apply of $CONF/setup.yaml" kadmin apply -f "$CONF/setup.yaml"

# ---------------------------------------------------------------- ready?
node_ready() {
    [ "$(kadmin get node localhost -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]
}
# A service account is usable by pods once the token controller gave it its token secret.
sa_ready() { # NAMESPACE NAME
    [ -n "$(kadmin -n "$1" get serviceaccount "$2" -o 'jsonpath={.secrets[0].name}')" ]
}
wait_for "the node localhost to be Ready" node_ready
wait_for "the service account default/default" sa_ready default default
wait_for "the service account $NAMESPACE/testbot-job" sa_ready "$NAMESPACE" testbot-job
wait_for "the service account $NAMESPACE/testbot-agent" sa_ready "$NAMESPACE" testbot-agent
touch "$RUN/ready"
log "cluster ready in $((SECONDS - START))s (logs in $LOGS)"

print_exports
