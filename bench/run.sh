#!/usr/bin/env bash
# idemd vs the "do it yourself" pgbench peer, same database server, same concurrency.
#   bench/run.sh [seconds-per-run] [repeats]   (defaults 10 and 1; needs PostgreSQL on
#                                               127.0.0.1:5432 and pgbench)
# Each cell runs `repeats` times; the median is reported. Prints one row per cell (with what one
# operation cost the whole box in CPU, box_cpu_us_per_op), writes them to bench/results.csv and
# the charts docs/throughput.svg and docs/latency.svg (p50), and ends with:
#   fresh ratio=X.XX replay ratio=Y.YY           (idemd ÷ peer in ops/s at 64 clients)
#   min fresh ratio=X.XX min replay ratio=Y.YY   (the lowest of those ratios at 4, 16 and 64)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
repeats=${2:-1}
admin=${IDEMD_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
# pgbench and psql go through libpq, whose default sslmode=prefer is TLS on a server with ssl=on;
# idemd's prefer is plaintext. Plaintext for both sides unless the caller says otherwise.
export PGSSLMODE=${PGSSLMODE:-disable}
db=idemd_bench_$$
psql "$admin" -qc "CREATE DATABASE $db"
url=${admin%/*}/$db
cleanup() {
  for pid in ${server:-} ${memory:-}; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
}
trap cleanup EXIT

cargo build --release --quiet -p idemd -p idemd-bench
release=${CARGO_TARGET_DIR:-target}/release
bench=$release/idemd-bench
# Fixed ports below Linux's ephemeral range (32768-60999), where no client socket can hold them.
idemd_port=20999 memory_port=20998
"$release"/idemd serve --listen 127.0.0.1:$idemd_port --metrics-listen 127.0.0.1:0 \
  --database-url "$url" --log-level warn &
server=$!
# The memory store, for the gRPC-ceiling comparison.
# Its record bound raised well past what the fresh cells create (~1.4 M keys at 3 repeats of
# 10 s), so no cell runs into STORE_FULL.
"$release"/idemd serve --listen 127.0.0.1:$memory_port --metrics-listen 127.0.0.1:0 \
  --max-records 50000000 --log-level warn &
memory=$!
for target in "$idemd_port" "$memory_port"; do
  for _ in $(seq 1 50); do
    $bench --target http://127.0.0.1:$target --duration 100ms --clients 1 >/dev/null 2>&1 && break
    sleep 0.2
  done
done
for pid in "$server" "$memory"; do
  kill -0 "$pid" 2>/dev/null || { echo "an idemd server did not start (see above)" >&2; exit 1; }
done
psql "$url" -qf bench/pgbench/schema.sql

echo "box: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), PostgreSQL $(psql "$url" -Atc 'SHOW server_version'), synchronous_commit=$(psql "$url" -Atc 'SHOW synchronous_commit'); ${seconds} s per run, median of ${repeats}"
csv=bench/results.csv
echo "system,workload,clients,ops_per_s,p50_ms,p99_ms,p999_ms,server_cpu_s,server_peak_rss_mib,runs" >"$csv"
printf '%-8s %-9s %7s %10s %8s %8s %8s %s\n' system workload clients ops/s p50_ms p99_ms p999_ms "extra (median run; all runs' ops/s)"

# Busy CPU time of the whole box so far (user, nice, system, irq, softirq, steal), in ticks: a
# cell's difference, divided by its operations, is what one operation cost the box (idemd or the
# peer, the load generator, PostgreSQL and the kernel together).
box_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }
hz=$(getconf CLK_TCK)
box_us_per_op() { awk -v t="$1" -v n="$2" -v hz="$hz" 'BEGIN { printf "%.0f", (n > 0 ? t * 1000000 / hz / n : 0) }'; }
median_line() { sort -t' ' -k1,1n | awk '{ lines[NR] = $0 } END { print lines[int((NR + 1) / 2)] }'; }
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$2"; }
declare -A tps p50s boxes

# idemd-bench `repeats` times; prints "<ops/s> <line>" of the median run, and all runs' ops/s.
run_idemd() {
  local target=$1 workload=$2 clients=$3 runs="" results=""
  for _ in $(seq 1 "$repeats"); do
    local line pid before after
    pid=$([ "$target" = "$idemd_port" ] && echo "$server" || echo "$memory")
    before=$(box_ticks)
    line=$($bench --target "http://127.0.0.1:$target" --workload "$workload" --clients "$clients" \
      --connections $(( clients < 8 ? clients : 8 )) --duration "${seconds}s" --keyspace 2000 \
      --server-pid "$pid")
    after=$(box_ticks)
    line="$line box_cpu_us_per_op=$(box_us_per_op $((after - before)) "$(field ops "$line")")"
    runs="$runs$(field ops_per_s "$line")/"
    results+="$(field ops_per_s "$line") $line"$'\n'
  done
  printf '%s|%s\n' "$(printf '%s' "$results" | median_line)" "${runs%/}"
}

report_idemd() {
  local system=$1 target=$2 workload=$3 clients=$4 out line runs
  out=$(run_idemd "$target" "$workload" "$clients")
  line=${out%|*}; runs=${out##*|}
  tps[$system-$workload-$clients]=$(field ops_per_s "$line")
  p50s[$system-$workload-$clients]=$(field p50_ms "$line")
  boxes[$system-$workload-$clients]=$(field box_cpu_us_per_op "$line")
  printf '%-8s %-9s %7s %10s %8s %8s %8s %s\n' "$system" "$workload" "$clients" \
    "$(field ops_per_s "$line")" "$(field p50_ms "$line")" "$(field p99_ms "$line")" \
    "$(field p999_ms "$line")" "errors=$(field errors "$line") cpu_s=$(field server_cpu_s "$line") client_cpu_s=$(field client_cpu_s "$line") box_cpu_us_per_op=$(field box_cpu_us_per_op "$line") peak_rss_mib=$(field server_peak_rss_mib "$line") runs=$runs"
  echo "$system,$workload,$clients,$(field ops_per_s "$line"),$(field p50_ms "$line"),$(field p99_ms "$line"),$(field p999_ms "$line"),$(field server_cpu_s "$line"),$(field server_peak_rss_mib "$line"),$runs" >>"$csv"
}

# pgbench `repeats` times: report_pgbench <system> <workload> <clients> <pgbench script args...>
report_pgbench() {
  local system=$1 workload=$2 clients=$3 runs="" results="" out
  shift 3
  local scripts=("$@")
  for _ in $(seq 1 "$repeats"); do
    # Every transaction's latency is logged, for the same percentiles idemd-bench reports.
    local logs before after
    logs=$(mktemp -d)
    before=$(box_ticks)
    out=$(pgbench -n -M prepared -c "$clients" -j $(( clients < 2 ? 1 : 2 )) -T "$seconds" \
      -l --log-prefix="$logs/tx" "${scripts[@]}" "$url" 2>&1) || {
      # E.g. too many clients: 64 pgbench sessions, idemd's pool and anyone else's sessions
      # must fit in max_connections.
      echo "pgbench failed: $out" >&2
      exit 1
    }
    after=$(box_ticks)
    local t l p n
    t=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1); t=${t%.*}
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    l=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
    p=$(cat "$logs"/tx* | awk '{ print $3 }' | sort -n | awk '{ v[NR] = $1 }
      END { q = "0.5 0.99 0.999"; split(q, qs, " ");
            for (i = 1; i <= 3; i++) { n = int(NR * qs[i]); if (n < 1) n = 1; printf "%.2f ", v[n] / 1000 } }')
    rm -rf "$logs"
    runs="$runs$t/"
    results+="$t $l $p$(box_us_per_op $((after - before)) "$n")"$'\n'
  done
  local median avg p50 p99 p999 box
  median=$(printf '%s' "$results" | median_line)
  read -r _ avg p50 p99 p999 box <<<"$median"
  tps[$system-$workload-$clients]=${median%% *}
  p50s[$system-$workload-$clients]=$p50
  boxes[$system-$workload-$clients]=$box
  printf '%-8s %-9s %7s %10s %8s %8s %8s %s\n' "$system" "$workload" "$clients" "${median%% *}" "$p50" "$p99" "$p999" "avg_ms=$avg box_cpu_us_per_op=$box runs=${runs%/}"
  echo "$system,$workload,$clients,${median%% *},$p50,$p99,$p999,,,${runs%/}" >>"$csv"
}

report_peer() {
  if [ "$1" = replay ]; then   # as idemd-bench: 90/10
    report_pgbench pgbench "$1" "$2" -f bench/pgbench/replay.sql@9 -f bench/pgbench/fresh.sql@1
  else
    report_pgbench pgbench "$1" "$2" -f bench/pgbench/fresh.sql
  fi
}

for workload in fresh replay; do
  for clients in 1 4 16 64; do
    report_idemd idemd "$idemd_port" "$workload" "$clients"
    report_peer "$workload" "$clients"
  done
done
# Where the fresh gap comes from: PostgreSQL alone running idemd's own SQL on idemd's table.
report_pgbench idemd-sql fresh 64 -f bench/pgbench/idemd-fresh.sql
report_idemd idemd "$idemd_port" contended 64
# The gRPC ceiling: the same server's health Check (no store), against the memory store's pairs.
for clients in 1 16 64; do
  report_idemd echo "$memory_port" echo "$clients"
  report_idemd memory "$memory_port" fresh "$clients"
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
python3 bench/chart.py "$csv" docs/throughput.svg
python3 bench/chart.py "$csv" docs/latency.svg p50_ms
for workload in fresh replay; do
  for clients in 1 4 16 64; do
    echo "$workload at $clients clients: ops/s ratio $(ratio "${tps[idemd-$workload-$clients]}" "${tps[pgbench-$workload-$clients]}"), p50 idemd ${p50s[idemd-$workload-$clients]} ms, peer ${p50s[pgbench-$workload-$clients]} ms, box CPU per op idemd ${boxes[idemd-$workload-$clients]} us, peer ${boxes[pgbench-$workload-$clients]} us"
  done
done
echo "memory store: $(ratio "$(( ${tps[memory-fresh-64]} * 2 ))" "${tps[echo-echo-64]}")x the echo ceiling in RPC/s at 64 clients (a pair is 2 RPCs)"
echo "single client: pair p50 idemd ${p50s[idemd-fresh-1]} ms, peer ${p50s[pgbench-fresh-1]} ms, echo ${p50s[echo-echo-1]} ms (target: idemd - peer <= 2 x echo + 0.10 ms; bench/single-client.sh measures it finer)"
echo "fresh ratio=$(ratio "${tps[idemd-fresh-64]}" "${tps[pgbench-fresh-64]}") replay ratio=$(ratio "${tps[idemd-replay-64]}" "${tps[pgbench-replay-64]}")"
lowest() { for c in 4 16 64; do ratio "${tps[idemd-$1-$c]}" "${tps[pgbench-$1-$c]}"; echo; done | sort -n | head -1; }
echo "min fresh ratio=$(lowest fresh) min replay ratio=$(lowest replay)"
