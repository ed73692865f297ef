#!/usr/bin/env bash
# Puts the testbot CLI on the runner: TESTBOT_CLI when set (self-hosted runners, tests), else the
# release asset for this OS and architecture, verified against its published SHA-256.
set -euo pipefail

if [ -n "${TESTBOT_CLI:-}" ]; then
    [ -x "$TESTBOT_CLI" ] || { echo "::error::TESTBOT_CLI=$TESTBOT_CLI is not an executable file"; exit 1; }
    echo "TESTBOT_CLI_PATH=$TESTBOT_CLI" >> "$GITHUB_ENV"
    exit 0
fi

version=${TESTBOT_CLI_VERSION:?}
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) target=x86_64-unknown-linux-gnu ;;
    Linux-aarch64 | Linux-arm64) target=aarch64-unknown-linux-gnu ;;
    Darwin-arm64) target=aarch64-apple-darwin ;;
    Darwin-x86_64) target=x86_64-apple-darwin ;;
    *) echo "::error::no testbot CLI is published for $(uname -s) $(uname -m); set TESTBOT_CLI to one you built"; exit 1 ;;
esac
base=${TESTBOT_RELEASES:-https://github.com/community-testbot/community-testbot/releases/download}
asset="testbot-$version-$target"
dir="${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-/tmp}}/testbot/$version"
mkdir -p "$dir"
if [ ! -x "$dir/testbot" ]; then
    curl -fsSL --retry 3 -o "$dir/$asset" "$base/v$version/$asset"
    curl -fsSL --retry 3 -o "$dir/$asset.sha256" "$base/v$version/$asset.sha256"
    want=$(cut -d' ' -f1 < "$dir/$asset.sha256")
    got=$(sha256sum "$dir/$asset" | cut -d' ' -f1)
    if [ "$want" != "$got" ]; then
        echo "::error::the downloaded testbot CLI does not match its published SHA-256 ($got, expected $want)"
        rm -f "$dir/$asset"
        exit 1
    fi
    chmod +x "$dir/$asset"
    mv "$dir/$asset" "$dir/testbot"
fi
echo "TESTBOT_CLI_PATH=$dir/testbot" >> "$GITHUB_ENV"
