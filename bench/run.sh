#!/usr/bin/env bash
# idemd vs the "do it yourself" pgbench peer, same database server, same concurrency.
#   bench/run.sh [seconds-per-run]   (default 10; needs PostgreSQL on 127.0.0.1:5432 and pgbench)
# Prints one row per run and ends with:  fresh ratio=X.XX replay ratio=Y.YY  (at 64 clients)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
admin=${IDEMD_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=idemd_bench_$$
psql "$admin" -qc "CREATE DATABASE $db"
url=${admin%/*}/$db
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT

cargo build --release --quiet --bin idemd --bin idemd-bench
./target/release/idemd serve --listen 127.0.0.1:50999 --metrics-listen 127.0.0.1:0 \
  --database-url "$url" --log-level warn &
server=$!
for _ in $(seq 1 50); do
  ./target/release/idemd-bench --target http://127.0.0.1:50999 --duration 100ms --clients 1 >/dev/null 2>&1 && break
  sleep 0.2
done
psql "$url" -qf bench/pgbench/schema.sql

echo "box: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(psql "$url" -Atc 'SHOW server_version'), synchronous_commit=$(psql "$url" -Atc 'SHOW synchronous_commit')"
printf '%-8s %-7s %8s %10s %9s %9s %9s %s\n' system workload clients ops/s p50_ms p99_ms p999_ms extra
declare -A idemd_tps peer_tps
for workload in fresh replay; do
  for clients in 1 16 64; do
    line=$(./target/release/idemd-bench --target http://127.0.0.1:50999 --workload "$workload" \
      --clients "$clients" --connections $(( clients < 8 ? clients : 8 )) --duration "${seconds}s" \
      --keyspace 2000 --server-pid "$server")
    get() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$line"; }
    idemd_tps[$workload-$clients]=$(get ops_per_s)
    printf '%-8s %-7s %8s %10s %9s %9s %9s %s\n' idemd "$workload" "$clients" "$(get ops_per_s)" \
      "$(get p50_ms)" "$(get p99_ms)" "$(get p999_ms)" "errors=$(get errors) cpu_s=$(get server_cpu_s) peak_rss_mib=$(get server_peak_rss_mib)"

    if [ "$workload" = replay ]; then
      scripts=(-f bench/pgbench/replay.sql@9 -f bench/pgbench/fresh.sql@1)   # as idemd-bench: 90/10
    else
      scripts=(-f bench/pgbench/fresh.sql)
    fi
    out=$(pgbench -n -M prepared -c "$clients" -j $(( clients < 2 ? 1 : 2 )) -T "$seconds" "${scripts[@]}" "$url" 2>&1)
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
    peer_tps[$workload-$clients]=${tps%.*}
    printf '%-8s %-7s %8s %10s %9s %9s %9s %s\n' pgbench "$workload" "$clients" "${tps%.*}" "avg=$lat" - - ""
  done
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
echo "fresh ratio=$(ratio "${idemd_tps[fresh-64]}" "${peer_tps[fresh-64]}") replay ratio=$(ratio "${idemd_tps[replay-64]}" "${peer_tps[replay-64]}")"
