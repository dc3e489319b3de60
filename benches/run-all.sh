#!/usr/bin/env bash
# Runs every standard workload against every target and prints the Markdown table of
# docs/benchmarks.md ("Load generator"): Strata with durability fsync and none (a broker
# the bench starts itself), NATS JetStream and Redis Streams where they answer on their
# default ports (else a "skipped" comment), the null target, and the disk baseline.
#
#   benches/run-all.sh                 # RUNS=2 by default; rows go to stdout
#   RUNS=3 WORKLOADS="small-max replay" benches/run-all.sh
#
# Each invocation's exact command precedes its row as an HTML comment, and its full
# JSON report is saved under $OUT. Progress lines go to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-2}
WORKLOADS=${WORKLOADS:-"small-max large-max latency-10k fanout replay"}
OUT=${OUT:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
BENCH=target/release/strata-bench

cargo build --release -q -p strata-broker --bin strata
cargo build --release -q -p strata-bench --features nats,redis
mkdir -p "$OUT"

echo "<!-- $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) × $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(free -g | awk '/Mem:/ {print $2}') GiB; Linux $(uname -r); commit $(git rev-parse --short HEAD); JSON in $OUT -->"
"$BENCH" --markdown-header

n=0
run() {
    for i in $(seq 1 "$RUNS"); do
        n=$((n + 1))
        echo "<!-- strata-bench $* -->"
        # Exit 1 (an incomplete run) still prints its row, marked; exit 2 is an error.
        "$BENCH" --markdown --save-json "$OUT/$n.json" "$@" || status=$?
        if [ "${status:-0}" -ge 2 ]; then
            echo "<!-- failed (exit $status): strata-bench $* -->"
        fi
        status=0
    done
}

run --workload disk
for w in $WORKLOADS; do
    run --workload "$w" --target strata --durability fsync
    run --workload "$w" --target strata --durability none
    run --workload "$w" --target nats
    run --workload "$w" --target redis
    run --workload "$w" --target null
done
