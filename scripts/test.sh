#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the end-to-end fleet tests (which start real
# testbot-broker, testbot-agent and testbot processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests run the real binaries; build them first.
cargo build --workspace --bins --locked

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --profile "${NEXTEST_PROFILE:-default}" "$@"
else
    cargo test --workspace --locked "$@"
fi
