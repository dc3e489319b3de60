#!/usr/bin/env bash
# Measures what one Prometheus scrape of /metrics costs on a busy broker: TOPICS topics
# of PARTITIONS partitions each (default 2 x 1,000), every partition written to, and
# four consumer groups per topic (strata-bench's fanout workload) that commit as they
# go, so the per-partition, per-group and lag series all exist. Then it scrapes
# SCRAPES times (default 20) and prints the body's size, its series count and the
# median and worst scrape times.
#
#   benches/metrics-scrape.sh
#   TOPICS=4 PARTITIONS=500 SCRAPES=50 benches/metrics-scrape.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TOPICS=${TOPICS:-2}
PARTITIONS=${PARTITIONS:-1000}
SCRAPES=${SCRAPES:-20}
DATA=${DATA:-target/tmp}
STRATA=target/release/strata
BENCH=target/release/strata-bench
cargo build --release -q -p strata-broker --bin strata
cargo build --release -q -p strata-bench
mkdir -p "$DATA"

DIR=$(mktemp -d "$DATA/metrics-scrape-XXXX")
"$STRATA" serve --listen 127.0.0.1:0 --data-dir "$DIR/data" >"$DIR/out" 2>"$DIR/log" &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 1 600); do
    ADDR=$(sed -n 's/^strata listening on //p' "$DIR/out")
    [ -n "$ADDR" ] && break
    sleep 0.05
done
[ -n "$ADDR" ] || { echo "broker did not start" >&2; cat "$DIR/log" >&2; exit 2; }
HTTP=$(sed -n 's|^strata http on http://||p' "$DIR/out")

for t in $(seq 1 "$TOPICS"); do
    echo "topic $t: $PARTITIONS partitions, 4 consumer groups" >&2
    "$BENCH" --broker "$ADDR" --workload fanout --partitions "$PARTITIONS" \
        --messages $((PARTITIONS * 20)) --disk-baseline-mib 0 --keep --quiet >/dev/null
done

curl -s "http://$HTTP/metrics" >"$DIR/body"
series=$(grep -vc '^#' "$DIR/body")
bytes=$(wc -c <"$DIR/body")
times=()
for _ in $(seq 1 "$SCRAPES"); do
    times+=("$(curl -s -o /dev/null -w '%{time_total}' "http://$HTTP/metrics")")
done
printf '%s\n' "${times[@]}" | sort -n | awk -v s="$series" -v b="$bytes" -v p="$PARTITIONS" -v t="$TOPICS" '
    {a[NR] = $1}
    END {
        m = NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "%d partitions, %d groups: %d series, %.1f KiB; scrape median %.1f ms, worst %.1f ms (%d scrapes)\n",
            t * p, t * 4, s, b / 1024, m * 1000, a[NR] * 1000, NR
    }'
