#!/usr/bin/env bash
# The admin API on one big namespace: ListRecords pages and GetNamespaceStats over real gRPC
# (idemd-bench's admin workloads), on a fresh database filled with RECORDS records.
#   bench/admin.sh [RECORDS] [SECONDS]   (defaults 1000000 and 10; needs PostgreSQL on
#                                         127.0.0.1:5432 and psql)
# IDEMD_BIN and IDEMD_BENCH_BIN pick the binaries (default: release builds of this tree).
#
# The records are written straight into the table (one INSERT ... SELECT from generate_series,
# as Acquire and Complete would leave them): 90 % completed, 10 % in progress (1 % of all stuck),
# created evenly over the last 24 hours, then VACUUM ANALYZE. GetNamespaceStats reads the
# per-minute counts the replicas flush into idemd_minute_counts, so the script writes those too,
# as the data plane would have counted these records (and 25 hours of minutes of 99 other
# namespaces, so the table is not the bench namespace's alone). One client at a time, so the
# latencies are those of one call on an idle server: ListRecords walks the listing 50 records a
# page from the newest; GetNamespaceStats reads the last hour and the last 24 hours;
# ListNamespaces counts every namespace's live records (a scan of the records table).
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-1000000}
seconds=${2:-10}
admin=${IDEMD_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export PGSSLMODE=${PGSSLMODE:-disable}
db=idemd_admin_bench_$$
url=${admin%/*}/$db
port=${IDEMD_BENCH_PORT:-20997}
addr=127.0.0.1:$port
ns=bench-admin
cleanup() {
  if [ -n "${server:-}" ]; then kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true; fi
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT
if [ -z "${IDEMD_BIN:-}" ] || [ -z "${IDEMD_BENCH_BIN:-}" ]; then
  cargo build --release --quiet -p idemd -p idemd-bench
fi
IDEMD_BIN=${IDEMD_BIN:-./target/release/idemd}
IDEMD_BENCH_BIN=${IDEMD_BENCH_BIN:-./target/release/idemd-bench}
psql "$admin" -qc "CREATE DATABASE $db"
"$IDEMD_BIN" migrate --database-url "$url" --log-level warn

echo "filling $records records..."
psql "$url" -q >/dev/null <<SQL
INSERT INTO idemd_records (namespace, key, state, fingerprint, lease_token, released,
    fencing_token, attempts, holder, retention_us, revision, created_at, lease_expires_at,
    completed_at, expires_at, result_body, result_code, result_meta_keys, result_meta_values)
SELECT '$ns', 'order-' || g,
    CASE WHEN g % 10 = 0 THEN 1 ELSE 2 END,
    '\x01', decode(md5(g::text), 'hex'), false, g, CASE WHEN g % 50 = 0 THEN 2 ELSE 1 END,
    'worker-' || (g % 64), 86400000000, 2, c,
    CASE WHEN g % 100 = 0 THEN c + interval '30 seconds' ELSE now() + interval '1 hour' END,
    CASE WHEN g % 10 = 0 THEN NULL ELSE c + interval '200 milliseconds' END,
    now() + interval '1 day',
    CASE WHEN g % 10 = 0 THEN NULL ELSE '\x7b226f6b223a747275657d'::bytea END,
    CASE WHEN g % 10 = 0 THEN NULL ELSE 200 END,
    CASE WHEN g % 10 = 0 THEN NULL ELSE '{content-type}'::text[] END,
    CASE WHEN g % 10 = 0 THEN NULL ELSE '{application/json}'::text[] END
FROM generate_series(1, $records) AS g,
    LATERAL (SELECT now() - (g::float8 / $records) * interval '24 hours' AS c) AS t;
SELECT setval('idemd_fencing_token_seq', $records);
INSERT INTO idemd_minute_counts (namespace, minute, created, completed, taken_over)
SELECT '$ns', minute, sum(created), sum(completed), sum(taken_over) FROM (
    SELECT date_trunc('minute', created_at, 'UTC') AS minute, 1 AS created, 0 AS completed,
        CASE WHEN attempts > 1 THEN 1 ELSE 0 END AS taken_over
    FROM idemd_records
    UNION ALL
    SELECT date_trunc('minute', completed_at, 'UTC'), 0, 1, 0
    FROM idemd_records WHERE completed_at IS NOT NULL
) AS events GROUP BY minute;
INSERT INTO idemd_minute_counts (namespace, minute, created, completed, taken_over)
SELECT 'other-' || n, date_trunc('minute', now() - m * interval '1 minute', 'UTC'), 10, 9, 1
FROM generate_series(1, 99) AS n, generate_series(0, 1499) AS m;
VACUUM ANALYZE idemd_records;
VACUUM ANALYZE idemd_minute_counts;
SQL

"$IDEMD_BIN" serve --listen "$addr" --metrics-listen 127.0.0.1:0 --database-url "$url" \
  --log-level warn &
server=$!
bench() {
  "$IDEMD_BENCH_BIN" --target "http://$addr" --clients 1 --connections 1 \
    --duration "${seconds}s" --namespace "$ns" "$@"
}
for _ in $(seq 1 100); do
  bench --workload echo --duration 100ms >/dev/null 2>&1 && break
  sleep 0.1
done
echo "records=$records"
bench --workload admin-list
bench --workload admin-stats --stats-window 1h
bench --workload admin-stats --stats-window 24h
bench --workload admin-namespaces
