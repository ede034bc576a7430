#!/usr/bin/env bash
# Where the time goes under the 64-client fresh load: a system-wide perf profile while
# idemd-bench drives idemd on PostgreSQL, reported by process and by idemd's hottest functions.
#   bench/profile.sh [seconds] [workload]     (defaults 10, fresh; needs perf and PostgreSQL)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
workload=${2:-fresh}
admin=${IDEMD_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=idemd_profile_$$
psql "$admin" -qc "CREATE DATABASE $db"
url=${admin%/*}/$db
out=$(mktemp -d /tmp/idemd-profile.XXXXXX)
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT

cargo build --release --quiet -p idemd -p idemd-bench
# Fixed ports below Linux's ephemeral range (32768-60999), where no client socket can hold them.
port=20997
./target/release/idemd serve --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
  --database-url "$url" --log-level warn &
server=$!
for _ in $(seq 1 50); do
  ./target/release/idemd-bench --target http://127.0.0.1:$port --duration 100ms --clients 1 >/dev/null 2>&1 && break
  sleep 0.2
done
kill -0 "$server" 2>/dev/null || { echo "idemd did not start (see above)" >&2; exit 1; }
./target/release/idemd-bench --target http://127.0.0.1:$port --workload "$workload" --clients 64 \
  --connections 8 --duration "$((seconds + 10))s" >"$out/bench.txt" &
bench=$!
sleep 1
# CPU seconds per program (all its processes), read from /proc before and after.
snapshot() {
  for stat in /proc/[0-9]*/stat; do
    awk '{ sub(/^[0-9]+ \(/, ""); name = $0; sub(/\).*/, "", name); n = split($0, f, ") ");
           split(f[n], g, " "); print name, g[12] + g[13] }' "$stat" 2>/dev/null || true
  done | awk '{ cpu[$1] += $2 } END { for (p in cpu) print p, cpu[p] }' | sort
}
snapshot >"$out/before"
perf record -q -g -F 999 -p "$server" -o "$out/perf.data" -- sleep "$seconds" 2>/dev/null
snapshot >"$out/after"
wait "$bench"
echo "load: $(cat "$out/bench.txt")"
echo
echo "CPU seconds per program during the ${seconds} s window (2 cores = $((2 * seconds)) s available):"
join "$out/before" "$out/after" | awk -v ticks="$(getconf CLK_TCK)" \
  '{ d = ($3 - $2) / ticks; if (d > 0.05) printf "  %-16s %6.2f s\n", $1, d }' | sort -k2 -rn
echo
echo "idemd's samples by library (self time):"
perf report -q -i "$out/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null \
  | grep -v '^$' | sed 's/ *$//' | head -8 || true # head closing the pipe early is fine
echo
echo "idemd's hottest functions (self time, share of idemd's samples):"
perf report -q -i "$out/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null \
  | grep -v '^$' | sed 's/ *$//' | cut -c1-160 | head -25 || true
echo "(perf data: $out/perf.data)"
