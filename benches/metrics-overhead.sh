#!/usr/bin/env bash
# Measures what metrics cost: small-max throughput of the current broker with a
# Prometheus-like scraper reading /metrics every second ("metrics on"), against a broker
# built without metrics ("metrics off", OLD=path to its strata binary, e.g. built from
# the commit before metrics), in the same run, alternating, ROUNDS times each.
#
#   OLD=/path/to/strata-before-metrics ROUNDS=3 benches/metrics-overhead.sh
#
# Each run produces MESSAGES (default 2,000,000) small-max messages, so besides the
# throughput it reports the broker's CPU time for the same work (user + system, from
# /proc/<pid>/stat): on a shared machine the CPU time per message is the steadier of
# the two. Prints one line per run and the medians. The brokers get fresh data
# directories under $DATA (default: target/tmp), on the project's disk. On a machine
# that other work shares, PRIO="nice -n -15" (as root) runs the brokers, the load and
# the scraper ahead of it.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
MESSAGES=${MESSAGES:-2000000}
DATA=${DATA:-target/tmp}
NEW=${NEW:-target/release/strata}
PRIO=${PRIO:-}
BENCH=target/release/strata-bench
: "${OLD:?set OLD to a strata binary built without metrics}"
cargo build --release -q -p strata-broker --bin strata
cargo build --release -q -p strata-bench
mkdir -p "$DATA"

# Starts a broker (binary $1) in a fresh directory; sets ADDR, HTTP and PID.
start() {
    DIR=$(mktemp -d "$DATA/metrics-overhead-XXXX")
    $PRIO "$1" serve --listen 127.0.0.1:0 --data-dir "$DIR/data" >"$DIR/out" 2>"$DIR/log" &
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

# The broker's CPU seconds so far (utime + stime, in USER_HZ = 100 ticks per second).
cpu() {
    awk '{print ($14 + $15) / 100}' "/proc/$PID/stat"
}

# One small-max run against the running broker; prints "msgs/s cpu-seconds".
run() {
    local before after rate
    before=$(cpu)
    rate=$($PRIO "$BENCH" --workload small-max --messages "$MESSAGES" --broker "$ADDR" --json |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["produced"]["throughput"]["msgs_per_s"]))')
    after=$(cpu)
    echo "$rate $(python3 -c "print(round($after - $before, 2))")"
}

on=(); off=(); on_cpu=(); off_cpu=()
for i in $(seq 1 "$ROUNDS"); do
    start "$OLD"
    read -r rate seconds < <(run)
    off+=("$rate"); off_cpu+=("$seconds")
    stop
    echo "round $i: metrics off (old binary): $rate msgs/s, broker CPU $seconds s" >&2

    start "$NEW"
    ( while sleep 1; do $PRIO curl -s -o /dev/null "http://$HTTP/metrics"; done ) &
    SCRAPER=$!
    read -r rate seconds < <(run)
    on+=("$rate"); on_cpu+=("$seconds")
    kill "$SCRAPER"
    stop
    echo "round $i: metrics on, scraped every second: $rate msgs/s, broker CPU $seconds s" >&2
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
m_off=$(median "${off[@]}"); m_on=$(median "${on[@]}")
c_off=$(median "${off_cpu[@]}"); c_on=$(median "${on_cpu[@]}")
echo "metrics off: msgs/s ${off[*]} (median $m_off); broker CPU s ${off_cpu[*]} (median $c_off)"
echo "metrics on:  msgs/s ${on[*]} (median $m_on); broker CPU s ${on_cpu[*]} (median $c_on)"
python3 -c "print(f'throughput on/off = {$m_on / $m_off:.3f}; broker CPU for the same messages on/off = {$c_on / $c_off:.3f}')"
