#!/usr/bin/env bash
# Installs a single-node Slurm (Debian bookworm: Slurm 22.05) and munge, if missing.
# Idempotent and quiet on success. Must run as root. Does not start anything: see start.sh.
set -euo pipefail
exec "$(dirname "$0")/../lib/apt-install.sh" slurmctld slurmd slurm-client munge
