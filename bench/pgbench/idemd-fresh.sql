-- Not the peer: idemd's own two hot-path statements (src/store/postgres/sql.rs,
-- ACQUIRE_INSERT_OR_GET then COMPLETE) on idemd's table, driven by pgbench. It shows what
-- PostgreSQL alone sustains for idemd's SQL and schema, without gRPC or idemd in the way.
\set k random(1, 9000000000000000)
WITH inserted AS (
    INSERT INTO idemd_records (namespace, key, state, fingerprint, lease_token, released,
        fencing_token, attempts, holder, retention_us, revision, created_at,
        lease_expires_at, expires_at)
    VALUES ('pgbench', :client_id || '-' || :k, 1, 'fp', decode(md5(:k::text), 'hex'), false,
        nextval('idemd_fencing_token_seq'), 1, 'pgbench', 86400000000, 1,
        now(), now() + 30000000 * interval '1 microsecond',
        now() + (30000000 + 86400000000::bigint) * interval '1 microsecond')
    ON CONFLICT (namespace, key) DO NOTHING
    RETURNING namespace, key, state, fingerprint, lease_token, released, fencing_token, attempts,
        holder, retention_us, revision, created_at, lease_expires_at, completed_at, expires_at,
        result_body, result_code, result_meta_keys, result_meta_values)
SELECT *, true AS created, now() AS db_now FROM inserted
UNION ALL
SELECT namespace, key, state, fingerprint, lease_token, released, fencing_token, attempts,
    holder, retention_us, revision, created_at, lease_expires_at, completed_at, expires_at,
    result_body, result_code, result_meta_keys, result_meta_values, false, now()
FROM idemd_records
WHERE namespace = 'pgbench' AND key = :client_id || '-' || :k AND NOT EXISTS (SELECT 1 FROM inserted);
UPDATE idemd_records SET
    state = 2, result_body = convert_to(repeat('x', 128), 'UTF8'), result_code = 200,
    result_meta_keys = '{}', result_meta_values = '{}',
    retention_us = COALESCE(NULL::bigint, retention_us),
    completed_at = now(),
    expires_at = now() + COALESCE(NULL::bigint, retention_us) * interval '1 microsecond',
    revision = revision + 1
WHERE namespace = 'pgbench' AND key = :client_id || '-' || :k
    AND lease_token = decode(md5(:k::text), 'hex')
    AND state = 1 AND NOT released AND expires_at > now()
RETURNING namespace, key, state, fingerprint, lease_token, released, fencing_token, attempts,
    holder, retention_us, revision, created_at, lease_expires_at, completed_at, expires_at,
    result_body, result_code, result_meta_keys, result_meta_values, now() AS db_now,
    CASE WHEN has_waiters THEN pg_notify('idemd_changes', namespace || '/' || key) END;
