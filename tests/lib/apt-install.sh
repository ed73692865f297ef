#!/usr/bin/env bash
# Installs Debian packages if missing: tests/lib/apt-install.sh PACKAGE...
# Idempotent and quiet on success; prints the apt output's tail on failure. Must run as root.
# Starts no service: a temporary /usr/sbin/policy-rc.d (only if none exists) keeps the
# packages' maintainer scripts from starting any while they install.
set -euo pipefail

PKGS=("$@")
[ "${#PKGS[@]}" -gt 0 ] || { echo "apt-install.sh: name the packages to install" >&2; exit 2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "apt-install.sh: must run as root" >&2
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
log=$(mktemp /tmp/testbot-apt-install.XXXXXX)
trap 'rm -f "$log"' EXIT

# No systemd here: keep the packages' maintainer scripts (slurmctld, docker.io, containerd...)
# from trying to start services.
# (invoke-rc.d consults policy-rc.d; exit 101 = "action forbidden".)
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
        echo "apt-install.sh: failed to install ${missing[*]}; apt output:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
fi

for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        echo "apt-install.sh: package $p still not installed" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
done
