#!/usr/bin/env bash
# Soak: runs a broker for DURATION seconds under a steady load (strata-bench at RATE
# messages/s of 1 KiB, its consumer set a consumer group) and consumer-group churn (a
# second group on the same topic whose only member, the client's `group_member`
# example, is replaced every CHURN_S seconds, so the group rebalances), and samples the
# broker every 10 s into a CSV: RSS, open descriptors, threads, and the summed lag of
# both groups. Then plots the samples as a PNG of four panels (matplotlib, from a venv
# it makes the first time). Flat lines mean nothing leaks.
#
#   DURATION=3600 RATE=90000 benches/soak.sh      # RATE: half the broker's max rate
#
# Writes $OUT/soak.csv and $OUT/soak.png (default OUT: target/soak). Uses the release
# binaries (built first), or BIN=target/debug for a quick run. The broker takes its
# settings from STRATA_* variables: segments of 64MiB and 256MiB of retention per
# partition unless they are set, so the run reaches a steady state (rolls and
# retention) and the disk use stays bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-3600}
RATE=${RATE:-10000}
CHURN_S=${CHURN_S:-30}
SAMPLE_S=${SAMPLE_S:-10}
OUT=${OUT:-target/soak}
BIN=${BIN:-target/release}
if [ "$BIN" = target/release ]; then
    cargo build --release -q -p strata-broker --bin strata
    cargo build --release -q -p strata-bench
    cargo build --release -q -p strata-client --example group_member
fi
MEMBER=${MEMBER:-$BIN/examples/group_member}
mkdir -p "$OUT"
DIR=$(mktemp -d "$OUT/run-XXXX")
export STRATA_DEFAULT_SEGMENT_BYTES=${STRATA_DEFAULT_SEGMENT_BYTES:-64MiB}
export STRATA_DEFAULT_RETENTION_BYTES=${STRATA_DEFAULT_RETENTION_BYTES:-256MiB}
export STRATA_RETENTION_CHECK_MS=${STRATA_RETENTION_CHECK_MS:-10s}
"$BIN/strata" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --data-dir "$DIR/data" \
    >"$DIR/out" 2>"$DIR/log" &
PID=$!
CHILDREN=()
cleanup() {
    for child in "${CHILDREN[@]}"; do kill "$child" 2>/dev/null || true; done
    kill -TERM "$PID" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 600); do
    ADDR=$(sed -n 's/^strata listening on //p' "$DIR/out")
    [ -n "$ADDR" ] && break
    sleep 0.05
done
[ -n "$ADDR" ] || { echo "the broker did not start" >&2; cat "$DIR/log" >&2; exit 2; }
HTTP=$(sed -n 's|^strata http on http://||p' "$DIR/out")

"$BIN/strata-bench" --broker "$ADDR" --message-bytes 1024 --partitions 4 --producers 1 \
    --consumer-sets 1 --consumers 1 --consumer-mode groups --rate "$RATE" --duration-s "$DURATION" --quiet \
    >"$DIR/bench.out" 2>&1 &
BENCH=$!
CHILDREN+=("$BENCH")
TOPIC=""
for _ in $(seq 1 600); do
    TOPIC=$("$BIN/strata" --broker "$ADDR" topic list | awk '/^bench-/ { print $1; exit }')
    [ -n "$TOPIC" ] && break
    sleep 0.1
done
[ -n "$TOPIC" ] || { echo "strata-bench created no topic" >&2; cat "$DIR/bench.out" >&2; exit 2; }

# The churning group: one member at a time, each replaced after CHURN_S seconds.
(
    member=""
    trap 'kill $member 2>/dev/null; exit 0' TERM
    while true; do
        "$MEMBER" --broker "$ADDR" --group churn --topic "$TOPIC" >/dev/null 2>&1 &
        member=$!
        sleep "$CHURN_S"
        kill "$member" 2>/dev/null || true
        wait "$member" 2>/dev/null || true
    done
) &
CHILDREN+=("$!")

echo "seconds,rss_kib,fds,threads,lag_records" >"$OUT/soak.csv"
START=$(date +%s)
while kill -0 "$BENCH" 2>/dev/null; do
    now=$(($(date +%s) - START))
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$PID/status")
    threads=$(awk '/^Threads:/ { print $2 }' "/proc/$PID/status")
    fds=$(find "/proc/$PID/fd" -mindepth 1 -maxdepth 1 | wc -l)
    lag=$(curl -s "http://$HTTP/metrics" |
        awk '/^strata_group_lag_records\{/ { sum += $NF } END { print sum + 0 }')
    echo "$now,$rss,$fds,$threads,$lag" >>"$OUT/soak.csv"
    sleep "$SAMPLE_S"
done
wait "$BENCH" || { echo "strata-bench failed" >&2; cat "$DIR/bench.out" >&2; exit 1; }

# One panel per column, drawn by matplotlib from a venv made here the first time.
VENV=${PLOT_VENV:-target/plot-venv}
if ! "$VENV/bin/python" -c "import matplotlib" 2>/dev/null; then
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q matplotlib
fi
"$VENV/bin/python" benches/soak-plot.py "$OUT/soak.csv" "$OUT/soak.png" \
    "soak: $RATE msgs/s of 1 KiB for $DURATION s, a rebalance every $CHURN_S s"
echo "samples: $OUT/soak.csv, plot: $OUT/soak.png"
tail -n 3 "$OUT/soak.csv"
