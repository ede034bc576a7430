#!/usr/bin/env bash
# The README's grpcurl walkthrough: list, describe, Acquire → Complete → Acquire (replay), Get,
# a health check, and the admin API (list, purge, audit), against a live idemd with auth off. CI
# runs it (tests/suite/grpcurl.rs).
#
#   scripts/grpcurl-walkthrough.sh [ADDR] [KEY]     (defaults: 127.0.0.1:50051, order-4711)
set -euo pipefail
addr=${1:-127.0.0.1:50051}
key=${2:-order-4711}

run() {
  local shown=() arg
  for arg in "$@"; do
    case $arg in
      *[{\ ]*) shown+=("'$arg'") ;;
      *) shown+=("$arg") ;;
    esac
  done
  echo "\$ grpcurl -plaintext ${shown[*]}"
  grpcurl -plaintext "$@"
  echo
}

run "$addr" list
run "$addr" describe idempotency.v1.IdempotencyService
run "$addr" describe idempotency.v1.AcquireRequest

# Claim the key: this caller does the work. The fingerprint is base64 in JSON.
acquire='{"namespace":"payments","key":"'"$key"'","fingerprint":"c2hhMjU2OmFiYw==","lease_ttl":"30s","holder":"checkout-7f9c"}'
echo "\$ grpcurl -plaintext -d '$acquire' $addr idempotency.v1.IdempotencyService/Acquire"
response=$(grpcurl -plaintext -d "$acquire" "$addr" idempotency.v1.IdempotencyService/Acquire)
echo "$response"
echo
token=$(printf '%s' "$response" | python3 -c 'import json, sys; print(json.load(sys.stdin)["lease"]["token"])')

# A duplicate arrives while the work runs: IN_PROGRESS, retry after the lease.
run -d '{"namespace":"payments","key":"'"$key"'","fingerprint":"c2hhMjU2OmFiYw=="}' \
  "$addr" idempotency.v1.IdempotencyService/Acquire

# The work is done: store its result (body {"charge":"ch_1"}, HTTP 201).
run -d '{"namespace":"payments","key":"'"$key"'","lease_token":"'"$token"'","result":{"body":"eyJjaGFyZ2UiOiJjaF8xIn0=","code":201,"metadata":{"content-type":"application/json"}}}' \
  "$addr" idempotency.v1.IdempotencyService/Complete

# The client retries after a timeout: the stored result comes back, the work does not run again.
run -d '{"namespace":"payments","key":"'"$key"'","fingerprint":"c2hhMjU2OmFiYw=="}' \
  "$addr" idempotency.v1.IdempotencyService/Acquire

run -d '{"namespace":"payments","key":"'"$key"'"}' "$addr" idempotency.v1.IdempotencyService/Get

run -d '{"service":"idempotency.v1.IdempotencyService"}' "$addr" grpc.health.v1.Health/Check

# The admin API: find the completed records of the namespace, purge the key for a support case,
# and read the audit entry. The key then behaves as never seen: Acquire gets it anew.
run -d '{"namespace":"payments","states":["RECORD_STATE_COMPLETED"],"page_size":10}' \
  "$addr" idempotency.admin.v1.AdminService/ListRecords
run "$addr" idempotency.admin.v1.AdminService/ListNamespaces
run -d '{"namespace":"payments","key":"'"$key"'","reason":"support ticket 1234: customer asked to retry"}' \
  "$addr" idempotency.admin.v1.AdminService/PurgeRecord
run -d '{"namespace":"payments","key":"'"$key"'","fingerprint":"c2hhMjU2OmFiYw=="}' \
  "$addr" idempotency.v1.IdempotencyService/Acquire
run -d '{"namespace":"payments"}' "$addr" idempotency.admin.v1.AdminService/ListAuditEntries
