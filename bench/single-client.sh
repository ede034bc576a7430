#!/usr/bin/env bash
# Where a single client's Acquire+Complete latency goes: alternating rounds against one idemd on
# PostgreSQL, each printing the p50 of
#   idemd_pair  idemd's pair through gRPC (idemd-bench, 1 client)
#   peer        the "do it yourself" pair (pgbench, bench/pgbench/fresh.sql)
#   idemd_sql   idemd's own two statements without gRPC (pgbench, bench/pgbench/idemd-fresh.sql)
#   echo        one gRPC round trip to the same server (the health Check)
#   peer_relayed the peer through a TCP relay that only copies bytes (socat, if installed): what
#               one hop between the client and PostgreSQL costs on this box before any work is
#               done in it. idemd's topology has the same hop, so this is the floor under its pair.
#   bench/single-client.sh [rounds] [idemd serve flags...]   (default 5 rounds; needs PostgreSQL
#                                                               on 127.0.0.1:5432 and pgbench)
# Each column is measured for SLICE seconds (default 5) per round, the columns in turn; the last
# line gives each column's median over the rounds. Many short rounds (SLICE=1) cancel the drift.
# Environment for the idemd process only: IDEMD_BENCH_ENV (e.g. TOKIO_WORKER_THREADS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
slice=${SLICE:-5}
shift || true
admin=${IDEMD_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
# pgbench and psql go through libpq, whose default sslmode=prefer is TLS on a server with ssl=on;
# idemd's prefer is plaintext. Plaintext for both sides unless the caller says otherwise.
export PGSSLMODE=${PGSSLMODE:-disable}
db=idemd_single_$$
psql "$admin" -qc "CREATE DATABASE $db"
url=${admin%/*}/$db
logs=$(mktemp -d)
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  [ -n "${relay:-}" ] && kill "$relay" 2>/dev/null && wait "$relay" 2>/dev/null || true
  rm -rf "$logs"
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
# Fixed ports below Linux's ephemeral range (32768-60999), where no client socket can hold them.
relay_port=20995
target=http://127.0.0.1:20996
if command -v socat >/dev/null; then
  host_port=${admin#*@}; host_port=${host_port%%/*}
  socat "TCP-LISTEN:$relay_port,bind=127.0.0.1,reuseaddr,fork,nodelay" "TCP:$host_port,nodelay" &
  relay=$!
else
  echo "socat not found: peer_relayed is skipped" >&2
fi

cargo build --release --quiet -p idemd -p idemd-bench
bench=./target/release/idemd-bench
# shellcheck disable=SC2086 # IDEMD_BENCH_ENV is a list of assignments
env ${IDEMD_BENCH_ENV:-} ./target/release/idemd serve --listen "${target#http://}" \
  --metrics-listen 127.0.0.1:0 --database-url "$url" --log-level error "$@" &
server=$!
for _ in $(seq 1 50); do
  $bench --target "$target" --duration 100ms --clients 1 >/dev/null 2>&1 && break
  sleep 0.2
done
kill -0 "$server" 2>/dev/null || { echo "idemd did not start (see above)" >&2; exit 1; }
psql "$url" -qf bench/pgbench/schema.sql

# The median of the numbers on standard input, one per line ("n/a" if there are none).
median() {
  sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "n/a") }'
}
bench_p50() { sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p'; }
pgbench_p50() {
  pgbench -n -M prepared -c 1 -T "$slice" -l --log-prefix="$logs/tx" -f "$1" "${2:-$url}" \
    >/dev/null 2>&1
  cat "$logs"/tx* | awk '{ printf "%.2f\n", $3 / 1000 }' | median
  rm -f "$logs"/tx*
}
for _ in $(seq 1 "$rounds"); do
  pair=$($bench --target "$target" --workload fresh --clients 1 --connections 1 \
    --duration "${slice}s" | bench_p50)
  echo_rtt=$($bench --target "$target" --workload echo --clients 1 --connections 1 \
    --duration "${slice}s" | bench_p50)
  peer=$(pgbench_p50 bench/pgbench/fresh.sql)
  sql=$(pgbench_p50 bench/pgbench/idemd-fresh.sql)
  relayed=n/a
  if [ -n "${relay:-}" ]; then
    relayed=$(pgbench_p50 bench/pgbench/fresh.sql "${url/$host_port/127.0.0.1:$relay_port}")
  fi
  echo "p50_ms idemd_pair=$pair peer=$peer idemd_sql=$sql echo=$echo_rtt peer_relayed=$relayed"
done | tee "$logs/rounds"
# The box's speed drifts from minute to minute; short slices taken in turn and their medians
# compare the columns under the same conditions.
line=median_p50_ms
for name in idemd_pair peer idemd_sql echo peer_relayed; do
  line="$line $name=$(sed -n "s/.* $name=\([0-9.][0-9.]*\).*/\1/p" "$logs/rounds" | median)"
done
echo "$line"
