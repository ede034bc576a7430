#!/usr/bin/env bash
# Installs and starts the PostgreSQL 15 server the tests and benchmarks use: Debian's packages
# (postgresql-15, which carries pgbench and the initdb/pg_ctl binaries the throwaway-cluster tests
# run), the cluster 15/main listening on 127.0.0.1:5432 only, trust auth on loopback, so
# postgres://postgres@127.0.0.1:5432/postgres works without a password.
#
# Run it first thing on a new machine; .ci/run calls it too. Idempotent: a second run changes
# nothing and succeeds. Quiet when all is well; loud and non-zero when there is no working server.
#
# Development and test only: trust auth means anyone on this machine can connect as any user.
set -euo pipefail

version=15
cluster=main
port=5432
bin=/usr/lib/postgresql/$version/bin
conf_dir=/etc/postgresql/$version/$cluster
url="postgres://postgres@127.0.0.1:$port/postgres"

fail() {
  echo "dev-postgres: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and manages the cluster as the postgres user)"

# 1. The packages. pg_createcluster would make a cluster on install; we make ours below.
if [ ! -x "$bin/postgres" ] || [ ! -x "$bin/pgbench" ] || ! command -v pg_ctlcluster >/dev/null; then
  echo "dev-postgres: installing postgresql-$version from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || fail "apt-get update failed"
  apt-get install -y -qq "postgresql-$version" "postgresql-client-$version" >/dev/null \
    || fail "apt-get install postgresql-$version failed"
fi
[ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/pgbench" ] \
  || fail "$bin lacks initdb, pg_ctl or pgbench after installing postgresql-$version"

# 2. The cluster.
if [ ! -f "$conf_dir/postgresql.conf" ]; then
  pg_createcluster --port "$port" "$version" "$cluster" >/dev/null \
    || fail "pg_createcluster $version $cluster failed"
fi

# 3. Its settings, in a conf.d file of ours (the package's postgresql.conf stays as shipped).
# synchronous_commit stays on (the default): every acknowledged Complete is flushed, and the
# benchmarks measure that. ssl stays as Debian ships it (on, with the snakeoil certificate).
settings="# Written by scripts/dev-postgres.sh: the test and benchmark server.
listen_addresses = '127.0.0.1'
port = $port
synchronous_commit = on
fsync = on
"
mkdir -p "$conf_dir/conf.d"
changed=0
if [ "$(cat "$conf_dir/conf.d/idemd-dev.conf" 2>/dev/null)" != "$(printf '%s' "$settings")" ]; then
  printf '%s' "$settings" >"$conf_dir/conf.d/idemd-dev.conf"
  changed=1
fi
grep -q "^include_dir = 'conf.d'" "$conf_dir/postgresql.conf" \
  || fail "$conf_dir/postgresql.conf does not include conf.d"

hba="# Written by scripts/dev-postgres.sh: trust on loopback, for tests and benchmarks only.
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
"
if [ "$(cat "$conf_dir/pg_hba.conf")" != "$(printf '%s' "$hba")" ]; then
  printf '%s' "$hba" >"$conf_dir/pg_hba.conf"
  changed=1
fi

# 4. Running, with these settings.
status=0
pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" status >/dev/null 2>&1 || status=$?
if [ "$status" = 0 ] && [ "$changed" = 1 ]; then
  pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" restart >/dev/null \
    || fail "restarting $version/$cluster failed; see /var/log/postgresql/postgresql-$version-$cluster.log"
elif [ "$status" != 0 ]; then
  pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start >/dev/null \
    || fail "starting $version/$cluster failed; see /var/log/postgresql/postgresql-$version-$cluster.log"
fi

# 5. Proof that the URL the tests use works.
for _ in $(seq 1 60); do
  pg_isready -q -h 127.0.0.1 -p "$port" && break
  sleep 0.5
done
pg_isready -q -h 127.0.0.1 -p "$port" || fail "no server answers on 127.0.0.1:$port"
answer=$(psql "$url" -XAtc 'SHOW server_version_num' 2>&1) || fail "cannot connect to $url: $answer"
[ "$((answer / 10000))" = "$version" ] || fail "the server on 127.0.0.1:$port is PostgreSQL $answer, not $version"

# 6. The database the README's `cargo run` line points at.
exists=$(psql "$url" -XAtc "SELECT 1 FROM pg_database WHERE datname = 'idemd'" 2>&1) \
  || fail "cannot list databases: $exists"
if [ "$exists" != 1 ]; then
  psql "$url" -XAqc 'CREATE DATABASE idemd' >/dev/null || fail "cannot create the database idemd"
fi
