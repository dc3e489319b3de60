#!/usr/bin/env bash
# librdkafka (kcat) producing 1 KiB records to Strata's Kafka listener, beside the same
# workload through the Rust client over gRPC, against one broker (docs/benchmarks.md).
#
#   cargo build --release -p strata-broker --bin strata -p strata-client --example produce_throughput
#   benches/kafka-produce.sh                 # RECORDS=200000 PARTITIONS=4 DURABILITY=fsync
#
# Needs kcat (Debian package kcat). Prints one line per client: records/s and MB/s of
# payload, from the start of the producing process to its exit (kcat exits once every
# record is acknowledged), and checks the topic holds every record.
set -euo pipefail
cd "$(dirname "$0")/.."

RECORDS=${RECORDS:-200000}
PARTITIONS=${PARTITIONS:-4}
DURABILITY=${DURABILITY:-fsync}
STRATA=target/release/strata
PRODUCE=target/release/examples/produce_throughput
for bin in "$STRATA" "$PRODUCE"; do
  [ -x "$bin" ] || { echo "kafka-produce: build first: $bin is missing" >&2; exit 1; }
done
command -v kcat >/dev/null || { echo "kafka-produce: kcat is not installed" >&2; exit 1; }

work=$(mktemp -d target/kafka-bench.XXXXXX)
broker=""
cleanup() {
  if [ -n "$broker" ]; then kill "$broker" 2>/dev/null || true; wait "$broker" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$STRATA" serve --data-dir "$work/data" --listen 127.0.0.1:0 --http-listen off \
  --kafka-listen 127.0.0.1:0 --default-durability "$DURABILITY" >"$work/out" 2>"$work/log" &
broker=$!
for _ in $(seq 100); do
  grep -q "strata listening on" "$work/out" 2>/dev/null && break
  sleep 0.1
done
grpc=$(awk '/strata listening on/ {print $4}' "$work/out")
kafka=$(awk '/strata kafka on/ {print $4}' "$work/out")
[ -n "$grpc" ] && [ -n "$kafka" ] || { echo "kafka-produce: the broker did not start" >&2; cat "$work/log" >&2; exit 1; }

# RECORDS lines of 1023 bytes + newline: 1 KiB records once kcat drops the newline.
python3 -c "
import sys
line = b'x' * 1023 + b'\n'
with open(sys.argv[1], 'wb') as f:
    for _ in range(int(sys.argv[2])):
        f.write(line)
" "$work/records" "$RECORDS"

"$STRATA" topic create --broker "$grpc" --partitions "$PARTITIONS" kafka-bench >/dev/null
start=$(date +%s.%N)
kcat -b "$kafka" -P -t kafka-bench -X acks=all <"$work/records"
end=$(date +%s.%N)
stored=$("$STRATA" topic describe --broker "$grpc" kafka-bench |
  awk '$1 ~ /^[0-9]+$/ && NF >= 5 {sum += $3} END {print sum + 0}')
python3 -c "
import sys
n, b, e, stored = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = e - b
print(f'kcat (librdkafka) over Kafka: {n / s:,.0f} records/s, {n * 1024 / s / 1e6:,.0f} MB/s, {s:.2f} s; topic holds {stored}')
" "$RECORDS" "$start" "$end" "$stored"

echo -n "Rust client over gRPC (idempotence off, as librdkafka's default): "
"$PRODUCE" --broker "$grpc" --records "$RECORDS" --record-bytes 1024 \
  --partitions "$PARTITIONS" --durability "$DURABILITY" --no-idempotence
