#!/usr/bin/env bash
# Builds a single-node Kubernetes 1.20.2 (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubelet, and the pause binary) from Debian bookworm's `kubernetes` source package with Debian's
# Go, and installs the binaries into CACHE_DIR/v1.20.2/bin, next to kubectl 1.20.2 taken from
# Debian's kubernetes-client package (extracted, not installed: see below). Also installs the
# Debian packages the cluster needs at run time (etcd-server, openssl, jq, docker.io).
# Idempotent: a fast no-op when the binaries of the current recipe are already there. Must run as
# root. Does not start anything: see start.sh.
#
#   tests/kubernetes/install.sh [CACHE_DIR]   (default CACHE_DIR: /var/cache/testbot-kubernetes)
#
# A build takes about 7-8 minutes on 2 cores and needs about 3.5 GB of disk under CACHE_DIR while
# it runs; the unpacked tree is deleted afterwards (the ~40 MB downloaded source is kept).
# Progress goes to stderr, the full build output to CACHE_DIR/build.log. Nothing goes to stdout.
set -euo pipefail

CACHE_DIR=${1:-${TESTBOT_KUBERNETES_CACHE_DIR:-/var/cache/testbot-kubernetes}}
KUBE_VERSION=v1.20.2
# The Debian source package to build: bookworm's 1.20.5+really1.20.2-* (1.20.2 in truth).
DEB_VERSION_GLOB='1.20.5+really1.20.2-*'
# Bump when the recipe below changes (patches, build flags, binaries): install.sh then rebuilds.
RECIPE_VERSION=3
RECIPE="testbot-kubernetes recipe $RECIPE_VERSION $KUBE_VERSION"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet pause kubectl)

log() { echo "install.sh: $*" >&2; }
die() { echo "install.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get install)"
HERE=$(cd "$(dirname "$0")" && pwd -P)

# Run-time packages: always checked (a quick no-op when installed). etcd-server: the cluster's
# store; docker.io: the kubelet's container runtime (dockershim), started by
# tests/containers/start.sh; openssl and curl: start.sh's certificates and health checks.
"$HERE/../lib/apt-install.sh" etcd-server openssl curl jq docker.io

mkdir -p "$CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd -P)
case "$CACHE_DIR" in *[[:space:]]* | *[\"\'\\]*)
    die "CACHE_DIR must not contain whitespace or quotes: $CACHE_DIR" ;;
esac
OUT=$CACHE_DIR/$KUBE_VERSION
BIN=$OUT/bin
STAMP=$OUT/stamp

installed() {
    local b
    [ -f "$STAMP" ] && [ "$(head -n 1 "$STAMP")" = "$RECIPE" ] || return 1
    for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}
installed && exit 0

# One build at a time per cache dir.
exec 9>"$CACHE_DIR/lock"
if ! flock -n 9; then
    log "another install.sh is building in $CACHE_DIR; waiting for it (up to 30 min)"
    flock -w 1800 9 || die "another install.sh holds $CACHE_DIR/lock for more than 30 min"
fi
installed && exit 0

START=$SECONDS
stage() { log "[$((SECONDS - START))s] $*"; }

# Build-only packages. golang-go: Debian's Go 1.19; dpkg-dev: dpkg-source; libc6-dev: the static
# libc for the pause binary; rsync: the kubernetes build scripts use it.
"$HERE/../lib/apt-install.sh" golang-go gcc libc6-dev make rsync dpkg-dev

# ---------------------------------------------------------------- source package
# The mirror: the first `deb` source for bookworm main in the machine's apt config (one-line
# *.list or deb822 *.sources), unless TESTBOT_KUBERNETES_MIRROR names one.
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [opt=val ...] URI SUITE COMPONENT...
        awk '$1 == "deb" {
                i = 2; opts = ""
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) { opts = opts " " $i; i++ } opts = opts " " $i; i++ }
                if ($(i + 1) != "bookworm") next
                for (j = i + 2; j <= NF; j++) if ($j == "main") {
                    sb = ""; if (match(opts, /signed-by=[^] ]+/)) sb = substr(opts, RSTART + 10, RLENGTH - 10)
                    print $i "\t" sb; exit
                }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 stanzas: Types, URIs, Suites, Components, Signed-By (a path), Enabled.
        awk 'BEGIN { RS = ""; FS = "\n" }
            {
                types = uris = suites = comps = sb = ""; enabled = "yes"
                for (k = 1; k <= NF; k++) {
                    line = $k
                    if (line ~ /^[ \t]*#/) continue
                    n = index(line, ":"); if (n == 0) continue
                    key = tolower(substr(line, 1, n - 1)); val = substr(line, n + 1)
                    gsub(/^[ \t]+|[ \t]+$/, "", val)
                    if (key == "types") types = " " val " "
                    else if (key == "uris") uris = val
                    else if (key == "suites") suites = " " val " "
                    else if (key == "components") comps = " " val " "
                    else if (key == "signed-by") sb = val
                    else if (key == "enabled") enabled = tolower(val)
                }
                if (enabled != "no" && types ~ / deb / && suites ~ / bookworm / && comps ~ / main /) {
                    split(uris, u, /[ \t]+/)
                    if (sb !~ /^\//) sb = ""
                    print u[1] "\t" sb; exit
                }
            }' "$f"
    done
}

SRC=$CACHE_DIR/src
APTDIR=$CACHE_DIR/apt
mkdir -p "$SRC" "$APTDIR/lists/partial" "$APTDIR/sources.list.d"

dsc=$(find "$SRC" -maxdepth 1 -name "kubernetes_${DEB_VERSION_GLOB}.dsc" | sort | tail -n 1)
if [ -z "$dsc" ]; then
    if [ -n "${TESTBOT_KUBERNETES_MIRROR:-}" ]; then
        mirror=$TESTBOT_KUBERNETES_MIRROR signed_by=""
    else
        IFS=$'\t' read -r mirror signed_by < <(find_mirror | head -n 1) || true
        [ -n "${mirror:-}" ] || die "no 'deb' source for bookworm main in /etc/apt/sources.list*;
set TESTBOT_KUBERNETES_MIRROR to a Debian mirror URL"
    fi
    opts="[arch=amd64${signed_by:+ signed-by=$signed_by}]"
    # A source list of its own, with its own lists and cache dirs: the system's apt config and
    # package lists stay as they are.
    printf 'deb-src %s %s bookworm main\n' "$opts" "$mirror" >"$APTDIR/sources.list"
    APT=(apt-get -q
        -o Dir::Etc::SourceList="$APTDIR/sources.list"
        -o Dir::Etc::SourceParts="$APTDIR/sources.list.d"
        -o Dir::State::Lists="$APTDIR/lists"
        -o Dir::Cache="$APTDIR/cache"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
        -o APT::Sandbox::User=root)
    stage "fetching the kubernetes source package (deb-src $mirror bookworm main)"
    alog=$CACHE_DIR/apt.log
    : >"$alog"
    "${APT[@]}" update >>"$alog" 2>&1 || die "apt-get update (deb-src) failed; tail of $alog:
$(tail -n 30 "$alog")"
    (cd "$SRC" && "${APT[@]}" source --download-only kubernetes) >>"$alog" 2>&1 ||
        die "apt-get source kubernetes failed; tail of $alog:
$(tail -n 30 "$alog")"
    dsc=$(find "$SRC" -maxdepth 1 -name "kubernetes_${DEB_VERSION_GLOB}.dsc" | sort | tail -n 1)
    [ -n "$dsc" ] || die "the mirror has no kubernetes source $DEB_VERSION_GLOB (got: $(ls "$SRC"))"
fi
deb_version=$(awk '/^Version:/ { print $2; exit }' "$dsc")

# ---------------------------------------------------------------- unpack and patch
BUILD=$CACHE_DIR/build
TREE=$BUILD/kubernetes
rm -rf "$BUILD"
mkdir -p "$BUILD"
stage "unpacking $(basename "$dsc") (about 3.5 GB are needed under $CACHE_DIR during the build)"
dpkg-source --no-check -x "$dsc" "$TREE" >"$BUILD/unpack.log" 2>&1 ||
    die "dpkg-source -x failed:
$(tail -n 20 "$BUILD/unpack.log")"

# patch_line FILE OLD NEW: replaces the one line that is exactly OLD (modulo indentation) by NEW.
patch_line() {
    local file=$TREE/$1 old=$2 new=$3 n
    n=$(grep -cxF -- "$old" <(sed 's/^[[:space:]]*//' "$file")) || true
    [ "$n" = 1 ] || die "patch: expected exactly one line '$old' in $1, found $n"
    OLD=$old NEW=$new perl -0pi -e 's/^([ \t]*)\Q$ENV{OLD}\E$/$1$ENV{NEW}/m' "$file"
    grep -qF -- "$new" "$file" || die "patch: $1 not changed"
}
stage "patching"
# CI containers often lack CAP_SYS_RESOURCE: a negative oom_score_adj is refused, and the kubelet would
# fail to start pod sandboxes (-998) and Guaranteed pods' containers (-997).
patch_line pkg/kubelet/dockershim/docker_sandbox.go \
    'defaultSandboxOOMAdj int = -998' 'defaultSandboxOOMAdj int = 0'
patch_line pkg/kubelet/qos/policy.go \
    'guaranteedOOMScoreAdj int = -997' 'guaranteedOOMScoreAdj int = 0'
# The kubelet would otherwise set host-wide sysctls (kernel.panic=10, kernel.panic_on_oops=1,
# vm.overcommit_memory=1, kernel.keys.root_max*) on this machine and leave them so. With this it
# only logs the differences (the behaviour it has for protectKernelDefaults, without failing).
patch_line pkg/kubelet/cm/container_manager_linux.go \
    'b := KernelTunableModify' 'b := KernelTunableWarn'
# Pods have no network here (dockerd runs with --bridge=none and the kubelet has no network
# plugin), so their sandbox has no IP. The kubelet would take that as "sandbox changed" on its
# next sync, about a second after the containers start, and kill the pod: a restartPolicy Never
# pod gets SIGTERM and, after its grace period, SIGKILL (exit 137); an OnFailure one would get a
# new sandbox over and over. With this, a sandbox without an IP is kept.
patch_line pkg/kubelet/kuberuntime/kuberuntime_manager.go \
    'if !kubecontainer.IsHostNetworkPod(pod) && sandboxStatus.Network.Ip == "" {' \
    'if false && !kubecontainer.IsHostNetworkPod(pod) && sandboxStatus.Network.Ip == "" { // testbot: pods have no network'
# Only the kubelet's container GC removes a stopped pod sandbox, and a deleted pod is gone from
# the API only once its sandbox is. The GC runs every minute: a deleted pod whose container never
# started (ErrImageNeverPull) would stay Terminating for up to a minute. Every 10 s instead.
patch_line pkg/kubelet/kubelet.go \
    'ContainerGCPeriod = time.Minute' 'ContainerGCPeriod = 10 * time.Second // testbot: was time.Minute'

# ---------------------------------------------------------------- build
# The tarball has no git metadata: the version comes from this file (hack/lib/version.sh).
cat >"$BUILD/version.env" <<EOF
KUBE_GIT_VERSION='$KUBE_VERSION'
KUBE_GIT_MAJOR='1'
KUBE_GIT_MINOR='20'
KUBE_GIT_TREE_STATE='clean'
KUBE_GIT_COMMIT='debian-$deb_version'
EOF
BLOG=$CACHE_DIR/build.log
WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet"
stage "building $WHAT with $(go version | awk '{ print $3 }') (about 7 min on 2 cores; log: $BLOG)"
(
    cd "$TREE"
    # Everything is vendored: no module downloads (GOPROXY=off), and the build's own GOFLAGS.
    unset GOFLAGS GOPATH GOROOT GOBIN
    export GOPROXY=off GOSUMDB=off GOTOOLCHAIN=local GO111MODULE=on
    # (hack/lib/golang.sh puts GOCACHE under _output/local/go itself.)
    export GOMODCACHE=$BUILD/gomodcache GOTMPDIR=$BUILD/tmp
    export KUBE_GIT_VERSION_FILE=$BUILD/version.env
    export HOME=$BUILD/home
    mkdir -p "$GOTMPDIR" "$HOME"
    exec make WHAT="$WHAT" KUBE_VERBOSE=1
) </dev/null >"$BLOG" 2>&1 9>&- &
make_pid=$!
# Progress: a line every 30 s with the size of the build's output dir (its Go build cache and
# the binaries; it grows to about 2.6 GB).
next=$((SECONDS + 30))
while kill -0 "$make_pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$next" ]; then
        mb=$(du -sm "$TREE/_output" 2>/dev/null | cut -f1 || true)
        stage "still building (_output: ${mb:-0} MB of about 2600)"
        next=$((SECONDS + 30))
    fi
    sleep 1
done
rc=0
wait "$make_pid" || rc=$?
[ "$rc" = 0 ] || die "the build failed (make exit $rc); tail of $BLOG:
$(tail -n 40 "$BLOG")"

stage "building the pause binary (static)"
PAUSE_C=$TREE/build/pause/linux/pause.c
[ -f "$PAUSE_C" ] || die "$PAUSE_C missing from the source tree"
gcc -Os -Wall -Werror -static -DVERSION=testbot-3.4.1 -o "$BUILD/pause" "$PAUSE_C" >>"$BLOG" 2>&1 ||
    die "gcc pause.c failed; tail of $BLOG:
$(tail -n 20 "$BLOG")"
strip "$BUILD/pause" 2>/dev/null || true

# kubectl: Debian's kubernetes-client (1.20.2, matching the server), extracted from its .deb. Not
# installed: on some machines /usr/bin/kubectl belongs to another package (the Google Cloud SDK's
# kubectl 1.32 dispatcher), and dpkg refuses to overwrite it.
stage "extracting kubectl from Debian's kubernetes-client package"
mkdir -p "$BUILD/deb"
download_client() {
    (cd "$BUILD/deb" && apt-get -q -o APT::Sandbox::User=root download kubernetes-client) >>"$BLOG" 2>&1
}
download_client || { apt-get -q update >>"$BLOG" 2>&1 && download_client; } ||
    die "apt-get download kubernetes-client failed; tail of $BLOG:
$(tail -n 20 "$BLOG")"
deb=$(find "$BUILD/deb" -maxdepth 1 -name 'kubernetes-client_*.deb' | head -n 1)
[ -n "$deb" ] || die "apt-get download kubernetes-client left no .deb"
dpkg-deb -x "$deb" "$BUILD/deb/root"
[ -x "$BUILD/deb/root/usr/bin/kubectl" ] || die "no usr/bin/kubectl in $(basename "$deb")"

# ---------------------------------------------------------------- install
stage "installing into $BIN"
GOBIN_OUT=$TREE/_output/local/bin/linux/amd64
[ -d "$GOBIN_OUT" ] || GOBIN_OUT=$TREE/_output/bin
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/bin"
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    [ -x "$GOBIN_OUT/$b" ] || die "the build produced no $b under $GOBIN_OUT"
    install -m 0755 "$GOBIN_OUT/$b" "$OUT.tmp/bin/$b"
done
install -m 0755 "$BUILD/pause" "$OUT.tmp/bin/pause"
install -m 0755 "$BUILD/deb/root/usr/bin/kubectl" "$OUT.tmp/bin/kubectl"
ver=$("$OUT.tmp/bin/kube-apiserver" --version 2>&1) || die "kube-apiserver --version failed: $ver"
[ "$ver" = "Kubernetes $KUBE_VERSION" ] || die "unexpected version: $ver"
{
    echo "$RECIPE"
    echo "source: kubernetes $deb_version (Debian bookworm)"
    echo "kubectl: $(basename "$deb")"
    echo "go: $(go version)"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - START))s"
} >"$OUT.tmp/stamp"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"

stage "removing the build tree"
rm -rf "$BUILD"
stage "done: ${BINARIES[*]} in $BIN"
