#!/usr/bin/env bash
# Installs a Docker engine (Debian's docker.io 20.10), rootful podman (4.3), runc and busybox-static
# (for the test image), if missing. Idempotent and quiet on success. Must run as root.
# Does not start anything: see start.sh.
set -euo pipefail

# runc is listed explicitly: podman depends on "crun | runc" and crun fails on this VM's hybrid
# cgroups. containerd comes with docker.io (dockerd runs its own managed containerd; no systemd).
PKGS=(docker.io podman runc busybox-static)

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root" >&2
    exit 1
fi

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/testbot-containers-install.XXXXXX)
trap 'rm -f "$log"' EXIT

# No systemd here: keep the packages' maintainer scripts (docker.io, containerd) from trying to
# start services. (invoke-rc.d consults policy-rc.d; exit 101 = "action forbidden".)
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
    trap 'rm -f "$log"; [ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
fi

apt_install() {
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1
}

# apt-get update only when the package lists do not know the packages (fresh machine).
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1 || ! apt_install; then
    if ! apt-get update -q >>"$log" 2>&1 || ! apt_install; then
        echo "install.sh: failed to install ${missing[*]}; apt output:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
fi

for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        echo "install.sh: package $p still not installed" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
done
