#!/usr/bin/env bash
# Builds testbot, starts a one-machine fleet (a broker on SQLite and a local shell agent), runs a
# sample job through it, and keeps the fleet running in the foreground (Ctrl-C stops it).
#
#   scripts/quickstart.sh          # fleet + sample job, then keep serving
#   scripts/quickstart.sh --check  # fleet + sample job, then stop (exit status = the job's)
#
# Environment: TESTBOT_DATA_DIR (default .testbot), TESTBOT_LISTEN (default 127.0.0.1:8471),
# TESTBOT_BIN (a testbot binary already built: skips the release build).
set -euo pipefail
cd "$(dirname "$0")/.."

check=false
[ "${1:-}" = "--check" ] && check=true
data_dir=${TESTBOT_DATA_DIR:-.testbot}
listen=${TESTBOT_LISTEN:-127.0.0.1:8471}

if [ -n "${TESTBOT_BIN:-}" ]; then
    testbot=$TESTBOT_BIN
    [ -x "$testbot" ] || { echo "quickstart: TESTBOT_BIN=$testbot is not an executable" >&2; exit 1; }
else
    cargo build --release --locked -p testbot
    testbot=target/release/testbot
fi

"$testbot" up --data-dir "$data_dir" --listen "$listen" &
fleet=$!
trap 'kill -TERM $fleet 2>/dev/null; kill -TERM $fleet 2>/dev/null; wait $fleet 2>/dev/null || true' EXIT

export TESTBOT_URL="http://$listen"
for _ in $(seq 1 100); do
    if [ -s "$data_dir/admin.token" ] && curl -fsS "$TESTBOT_URL/api/v1/health" >/dev/null 2>&1; then
        break
    fi
    kill -0 $fleet 2>/dev/null || { echo "quickstart: testbot up exited" >&2; exit 1; }
    sleep 0.1
done
TESTBOT_TOKEN=$(cat "$data_dir/admin.token")
export TESTBOT_TOKEN

echo
echo "quickstart: running a sample job:"
echo "  $testbot run -- 'echo hello from \$TESTBOT_AGENT; uname -sm; echo a warning >&2'"
status=0
"$testbot" run -- 'echo hello from $TESTBOT_AGENT; uname -sm; echo a warning >&2' || status=$?
echo "quickstart: the sample job exited with status $status"

if $check; then
    exit $status
fi
echo "quickstart: the fleet keeps running; press Ctrl-C to stop it."
wait $fleet
