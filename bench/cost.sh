#!/usr/bin/env bash
# What one operation costs, on a fixed workload, A/B between builds or schema variants, in turns:
#   bench/cost.sh [operations] [rounds]        (defaults 40000 and 3)
# Each variant of each round gets a new database, a new idemd on it, 64 of the pool's warm-up
# pairs, then exactly `operations` operations of WORKLOAD (default fresh) at CLIENTS (default 64)
# through idemd-bench --operations. Prints per variant and round: ops/s, p50, idemd's CPU µs per
# operation (/proc utime+stime), the CPU µs per operation of idemd's PostgreSQL backends (the
# same, summed over the backends of its database), WAL bytes per operation (the whole
# server's WAL: other sessions on the same server count too), the share of the records table's
# updates that were HOT (no new index entries; counted since the database was made) and the
# table's size in 8 KiB pages.
#
#   VARIANTS="name:bindir[:setup.sql] ..."   bindir holds idemd and idemd-bench; setup.sql runs
#                                             on the migrated database before idemd starts
#                                             (default: this tree's release build, no setup)
#   CALLGRIND=1                              run idemd under callgrind instead and print the
#                                             instructions it executed per operation (counted
#                                             from after the warm-up: repeatable on a busy box)
set -euo pipefail
cd "$(dirname "$0")/.."
operations=${1:-40000}
rounds=${2:-3}
workload=${WORKLOAD:-fresh}
clients=${CLIENTS:-64}
admin=${IDEMD_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export PGSSLMODE=${PGSSLMODE:-disable}
release=${CARGO_TARGET_DIR:-target}/release
if [ -z "${VARIANTS:-}" ]; then
  cargo build --release --quiet -p idemd -p idemd-bench
  VARIANTS="this:$release"
fi
if [ -n "${CALLGRIND:-}" ]; then
  command -v valgrind >/dev/null || { echo "CALLGRIND needs valgrind (apt-get install valgrind)" >&2; exit 1; }
fi
db=idemd_cost_$$
url=${admin%/*}/$db
port=20996
work=$(mktemp -d)
cleanup() {
  if [ -n "${server:-}" ]; then kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true; fi
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
  rm -rf "$work"
}
trap cleanup EXIT
ticks() {   # utime+stime of the given processes, in clock ticks
  local total=0 pid
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] && total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
  done
  echo "$total"
}
hz=$(getconf CLK_TCK)
for round in $(seq 1 "$rounds"); do
  for variant in $VARIANTS; do
    IFS=: read -r name dir setup <<<"$variant"
    psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" 2>/dev/null
    "$dir/idemd" migrate --database-url "$url" --log-level warn
    if [ -n "$setup" ]; then psql "$url" -q -v ON_ERROR_STOP=1 -f "$setup"; fi
    wrapper=()
    if [ -n "${CALLGRIND:-}" ]; then
      wrapper=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.%p")
    fi
    "${wrapper[@]}" "$dir/idemd" serve --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:0 \
      --database-url "$url" --log-level error --no-migrate 2>"$work/server.log" &
    server=$!
    for _ in $(seq 1 200); do
      "$dir/idemd-bench" --target http://127.0.0.1:$port --workload echo --duration 50ms \
        --clients 1 >/dev/null 2>&1 && break
      sleep 0.1
    done
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    # Warm up: the pool's connections and their prepared statements (and the replay keys).
    "$dir/idemd-bench" --target http://127.0.0.1:$port --workload "$workload" --clients 16 \
      --operations 2000 --keyspace 2000 >/dev/null
    [ -n "${CALLGRIND:-}" ] && callgrind_control --zero "$server" >/dev/null
    backends=$(psql "$admin" -Atq -c "SELECT pid FROM pg_stat_activity
      WHERE datname = '$db' AND backend_type = 'client backend'")
    wal_before=$(psql "$admin" -Atq -c "SELECT pg_current_wal_lsn()")
    # shellcheck disable=SC2086
    db_before=$(ticks $backends)
    line=$("$dir/idemd-bench" --target http://127.0.0.1:$port --workload "$workload" \
      --clients "$clients" --connections 8 --operations "$operations" --keyspace 2000 \
      --server-pid "$server")
    # shellcheck disable=SC2086
    db_after=$(ticks $backends)
    wal=$(psql "$admin" -Atq -c "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$wal_before')::bigint")
    field() { sed -n "s/.* $1=\([0-9.]*\).*/\1/p" <<<"$line"; }
    ops=$(field ops)
    extra=""
    if [ -n "${CALLGRIND:-}" ]; then
      callgrind_control --dump=measured "$server" >/dev/null
      profile=$(grep -l "Trigger: dump measured" "$work"/callgrind.* | head -1)
      instructions=$(awk '/^summary:/ { print $2; exit }' "$profile")
      extra=" instructions_per_op=$((instructions / ops))"
      rm -f "$work"/callgrind.*
    fi
    kill "$server"; wait "$server" 2>/dev/null || true; server=""
    # Its backends report their table statistics as they exit: the share of updates that were
    # HOT (no new index entries) and the table's size.
    storage=$(psql "$url" -Atq -F' ' -c "SELECT round(100.0 * n_tup_hot_upd / greatest(n_tup_upd, 1), 1),
        pg_relation_size('idemd_records') / 8192 FROM pg_stat_user_tables WHERE relname = 'idemd_records'")
    echo "round=$round variant=$name ops=$ops ops_per_s=$(field ops_per_s) p50_ms=$(field p50_ms)" \
      "errors=$(field errors) idemd_cpu_us_per_op=$(field server_cpu_us_per_op)" \
      "db_cpu_us_per_op=$(( (db_after - db_before) * 1000000 / hz / ops ))" \
      "wal_bytes_per_op=$(( wal / ops )) hot_update_pct=${storage% *} table_pages=${storage#* }$extra"
  done
done
