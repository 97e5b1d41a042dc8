#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), or until RUNS
# executions when RUNS is given (SECONDS is then the ceiling), starting from
# the seeds in seeds/<target> and the corpus kept in corpus/<target>. A crash
# stops the run with libFuzzer's report and leaves the input in
# artifacts/<target>/. The long runs in RELIABILITY.md use the same script:
#   bash fuzz/run.sh 7200 10000000
# OUTPOST_FUZZ_FLAGS goes to cargo fuzz build and run (for example
# --no-trace-compares, which triples the rate of the text targets whose
# time goes to the regex crate's instrumented comparisons), and
# OUTPOST_FUZZ_TARGETS picks targets (default: all).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
runs=${2:--1}
# cargo fuzz passes the sanitizer flags that only nightly compilers take by
# default; the toolchain on these machines is stable.
export RUSTC_BOOTSTRAP=1
# shellcheck disable=SC2086 # flags are words
cargo fuzz build ${OUTPOST_FUZZ_FLAGS:-}
for target in ${OUTPOST_FUZZ_TARGETS:-$(cargo fuzz list)}; do
    mkdir -p "corpus/$target" "seeds/$target"
    printf '\n== fuzz %s for %s s\n' "$target" "$secs"
    log="artifacts/$target.log"
    mkdir -p artifacts
    # shellcheck disable=SC2086
    if ! cargo fuzz run ${OUTPOST_FUZZ_FLAGS:-} "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -runs="$runs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 80 "$log"
        echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$log" || true
done
