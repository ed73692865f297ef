#!/usr/bin/env bash
# Builds every fuzz target of fuzz/ and runs each for SECONDS (default 20), then prints a table:
# target, executions, executions per second, coverage (libFuzzer's `cov`), result. Fails if a
# target crashes, hangs or runs out of memory (its input is saved under fuzz/artifacts/TARGET/),
# and fails, rather than passing without running, when nightly Rust or cargo-fuzz is missing.
#
#   scripts/fuzz.sh [SECONDS]
#
# New inputs that a run finds go to a scratch directory, not to the committed corpus under
# fuzz/corpus/: add one there by hand when it is worth keeping (see docs/fuzzing.md).
# TESTBOT_FUZZ_TARGET_DIR: the build directory (default fuzz/target); CI keeps one across runs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
case $seconds in
'' | *[!0-9]*) echo "scripts/fuzz.sh: SECONDS must be a whole number, not \"$seconds\"" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: the fuzz targets need nightly Rust (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2
    exit 1
fi
export CARGO_TARGET_DIR=${TESTBOT_FUZZ_TARGET_DIR:-$PWD/fuzz/target}

cd fuzz
# -O: release without debug assertions, as the binaries ship (and one build, not two: `run`
# without -O would build everything again with overflow checks).
build_start=$SECONDS
cargo +nightly fuzz build -O
echo "scripts/fuzz.sh: built the targets in $((SECONDS - build_start)) s"

scratch=$(mktemp -d /tmp/testbot-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
rows=()
failed=()
for target in $(cargo +nightly fuzz list); do
    mkdir -p "$scratch/$target" "corpus/$target"
    log=$scratch/$target.log
    echo "scripts/fuzz.sh: running $target for $seconds s"
    # The scratch directory first: libFuzzer writes what it finds to the first corpus only.
    # -timeout: an input that takes this long is a hang, and fails the run.
    if cargo +nightly fuzz run -O "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        failed+=("$target")
    fi
    # The last status line reads `#RUNS ... cov: N ft: N corp: N/Nb ... exec/s: N ...`.
    status=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    # -print_final_stats adds `stat::number_of_executed_units: N` and its average speed.
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$status")
    runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
    speed=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log" | tail -n 1)
    rows+=("$target ${runs:--} ${speed:--} ${cov:--} $result")
    if [ "$result" = FAILED ]; then
        echo "scripts/fuzz.sh: $target failed; the end of its output:" >&2
        tail -n 60 "$log" >&2
    fi
done

echo
echo "Fuzzing, $seconds s per target:"
printf '  %-20s %12s %10s %8s %s\n' target executions exec/s cov result
for row in "${rows[@]}"; do
    # shellcheck disable=SC2086
    printf '  %-20s %12s %10s %8s %s\n' $row
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "scripts/fuzz.sh: ${#failed[@]} target(s) failed: ${failed[*]}; inputs under fuzz/artifacts/" >&2
    exit 1
fi
echo "scripts/fuzz.sh: ${#rows[@]} targets ran without a failure"
