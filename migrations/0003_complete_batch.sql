-- Complete for a batch of leases in one statement and one commit (see src/store/postgres/batch.rs).
-- One set-based UPDATE joins the input rows to their records by primary key, with the same guard
-- as the one-by-one Complete. The plan must be the nested loop over the primary key whatever the
-- table's size or statistics were when it was cached: a plan made while the table was new and
-- small otherwise goes on scanning every row as the table grows. So the function's own settings
-- rule out sequential scans, hash and merge joins, and the expiry guard is written as an
-- expression the expires_at index cannot serve (else a small table's plan scans that index for
-- every live row); the primary key is then the only way in, from a table of a few rows up.
-- Metadata arrive flattened: row i's names and values are meta_names[meta_starts[i] ..
-- meta_starts[i] + meta_counts[i] - 1] (and the same slice of meta_values).
-- An input row that repeats an earlier one's key is left out. Returns one row per applied input:
-- the record, the database time, whether a NOTIFY was sent, and the input's 0-based position.
-- Rows it does not apply return nothing: the caller decides them one by one.
CREATE FUNCTION idemd_complete_batch(
    namespaces text[], keys text[], tokens bytea[], bodies bytea[], codes integer[],
    meta_names text[], meta_values text[], meta_starts integer[], meta_counts integer[],
    retentions bigint[])
RETURNS TABLE (namespace text, key text, state smallint, fingerprint bytea, lease_token bytea,
    released boolean, fencing_token bigint, attempts integer, holder text, retention_us bigint,
    revision bigint, created_at timestamptz, lease_expires_at timestamptz,
    completed_at timestamptz, expires_at timestamptz, result_body bytea, result_code integer,
    result_meta_keys text[], result_meta_values text[], db_now timestamptz, notified boolean,
    input_position integer)
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
    UPDATE idemd_records r SET
        state = 2, result_body = i.body, result_code = i.code,
        result_meta_keys = meta_names[i.meta_start : i.meta_start + i.meta_count - 1],
        result_meta_values = meta_values[i.meta_start : i.meta_start + i.meta_count - 1],
        retention_us = COALESCE(i.retention, r.retention_us),
        completed_at = now(),
        expires_at = now() + COALESCE(i.retention, r.retention_us) * interval '1 microsecond',
        revision = r.revision + 1
    FROM (SELECT DISTINCT ON (u.namespace, u.key) u.*
          FROM unnest(namespaces, keys, tokens, bodies, codes, meta_starts, meta_counts,
                      retentions) WITH ORDINALITY
              AS u(namespace, key, token, body, code, meta_start, meta_count, retention, position)
          ORDER BY u.namespace, u.key, u.position) AS i
    WHERE r.namespace = i.namespace AND r.key = i.key AND r.lease_token = i.token
        AND r.state = 1 AND NOT r.released AND (r.expires_at + interval '0 seconds') > now()
    RETURNING r.namespace, r.key, r.state, r.fingerprint, r.lease_token, r.released,
        r.fencing_token, r.attempts, r.holder, r.retention_us, r.revision, r.created_at,
        r.lease_expires_at, r.completed_at, r.expires_at, r.result_body, r.result_code,
        r.result_meta_keys, r.result_meta_values, now(),
        CASE WHEN r.has_waiters
            THEN (SELECT true FROM pg_notify('idemd_changes', r.namespace || '/' || r.key))
        END,
        (i.position - 1)::integer;
END
$$;
