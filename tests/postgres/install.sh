#!/usr/bin/env bash
# Installs PostgreSQL 15 (Debian bookworm's postgresql-15 server and postgresql-client-15), if
# missing. Idempotent and quiet on success. Must run as root. Does not start anything: see start.sh.
#
# The server package, not the `postgresql` metapackage: start.sh runs the binaries of version 15
# (/usr/lib/postgresql/15/bin) by path. The packages' own cluster (15/main, port 5432) is created
# by their maintainer scripts but not started (apt-install.sh's policy-rc.d), and is never used.
set -euo pipefail
exec "$(dirname "$0")/../lib/apt-install.sh" postgresql-15 postgresql-client-15
