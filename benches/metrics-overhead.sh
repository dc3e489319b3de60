#!/usr/bin/env bash
# Measures what metrics cost: small-max throughput of the current broker with a
# Prometheus-like scraper reading /metrics every second ("metrics on"), against a broker
# built without metrics ("metrics off", OLD=path to its strata binary, e.g. built from
# the commit before metrics), in the same run, alternating, ROUNDS times each.
#
#   OLD=/path/to/strata-before-metrics ROUNDS=3 benches/metrics-overhead.sh
#
# Prints one line per run and the medians. The brokers get fresh data directories under
# $DATA (default: target/tmp), on the project's disk.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DATA=${DATA:-target/tmp}
NEW=${NEW:-target/release/strata}
BENCH=target/release/strata-bench
: "${OLD:?set OLD to a strata binary built without metrics}"
cargo build --release -q -p strata-broker --bin strata -p strata-bench
mkdir -p "$DATA"

# Starts a broker (binary $1) in a fresh directory; sets ADDR, HTTP and PID.
start() {
    DIR=$(mktemp -d "$DATA/metrics-overhead-XXXX")
    "$1" serve --listen 127.0.0.1:0 --data-dir "$DIR/data" >"$DIR/out" 2>"$DIR/log" &
    PID=$!
    for _ in $(seq 1 600); do
        ADDR=$(sed -n 's/^strata listening on //p' "$DIR/out")
        [ -n "$ADDR" ] && break
        sleep 0.05
    done
    [ -n "$ADDR" ] || { echo "broker $1 did not start" >&2; cat "$DIR/log" >&2; exit 2; }
    HTTP=$(sed -n 's|^strata http on http://||p' "$DIR/out")
}

stop() {
    kill -TERM "$PID" && wait "$PID" || true
    rm -rf "$DIR"
}

# One small-max run against the running broker; prints msgs/s.
run() {
    "$BENCH" --workload small-max --broker "$ADDR" --json | python3 -c \
        'import json,sys; print(round(json.load(sys.stdin)["produced"]["throughput"]["msgs_per_s"]))'
}

on=(); off=(); scrapes=0
for i in $(seq 1 "$ROUNDS"); do
    start "$OLD"
    off+=("$(run)")
    stop
    echo "round $i: metrics off (old binary): ${off[-1]} msgs/s" >&2

    start "$NEW"
    ( while sleep 1; do curl -s -o /dev/null "http://$HTTP/metrics"; done ) &
    SCRAPER=$!
    on+=("$(run)")
    kill "$SCRAPER"
    scrapes=$(curl -s "http://$HTTP/metrics" | sed -n 's/^strata_request_duration_seconds_count{listener="grpc",rpc="Produce"} //p')
    stop
    echo "round $i: metrics on, scraped every second: ${on[-1]} msgs/s ($scrapes produce requests timed)" >&2
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
m_off=$(median "${off[@]}"); m_on=$(median "${on[@]}")
echo "metrics off: runs ${off[*]}; median $m_off msgs/s"
echo "metrics on:  runs ${on[*]}; median $m_on msgs/s"
python3 -c "print(f'on / off = {$m_on / $m_off:.3f}')"
