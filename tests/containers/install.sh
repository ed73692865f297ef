#!/usr/bin/env bash
# Installs a Docker engine (Debian's docker.io 20.10), rootful podman (4.3), runc and busybox-static
# (for the test image), if missing. Idempotent and quiet on success. Must run as root.
# Does not start anything: see start.sh.
set -euo pipefail
# runc is listed explicitly: podman depends on "crun | runc" and crun fails on this VM's hybrid
# cgroups. containerd comes with docker.io (dockerd runs its own managed containerd; no systemd).
exec "$(dirname "$0")/../lib/apt-install.sh" docker.io podman runc busybox-static
