-- Complete for a batch of leases in one statement and one commit (see src/store/postgres/batch.rs).
-- Each input row is applied by primary key with the same guard as the one-by-one Complete, so the
-- plan never depends on the table's size or statistics (a set-based UPDATE … FROM unnest(…) joined
-- by a plan made while the table was new and small went on scanning every row as it grew).
-- Returns one row per applied input: the record, the database time, whether a NOTIFY was sent,
-- and the input's 0-based position. Rows it does not apply return nothing: the caller decides
-- them one by one.
CREATE FUNCTION idemd_complete_batch(
    namespaces text[], keys text[], tokens bytea[], bodies bytea[], codes integer[],
    metadata text[], retentions bigint[])
RETURNS TABLE (namespace text, key text, state smallint, fingerprint bytea, lease_token bytea,
    released boolean, fencing_token bigint, attempts integer, holder text, retention_us bigint,
    revision bigint, created_at timestamptz, lease_expires_at timestamptz,
    completed_at timestamptz, expires_at timestamptz, result_body bytea, result_code integer,
    result_meta_keys text[], result_meta_values text[], db_now timestamptz, notified boolean,
    input_position integer)
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(keys, 1), 0) LOOP
        RETURN QUERY
        UPDATE idemd_records r SET
            state = 2, result_body = bodies[i], result_code = codes[i],
            -- metadata[i] is the JSON [[names…], [values…]]
            result_meta_keys = ARRAY(SELECT jsonb_array_elements_text(metadata[i]::jsonb -> 0)),
            result_meta_values = ARRAY(SELECT jsonb_array_elements_text(metadata[i]::jsonb -> 1)),
            retention_us = COALESCE(retentions[i], r.retention_us),
            completed_at = now(),
            expires_at = now() + COALESCE(retentions[i], r.retention_us) * interval '1 microsecond',
            revision = r.revision + 1
        WHERE r.namespace = namespaces[i] AND r.key = keys[i] AND r.lease_token = tokens[i]
            AND r.state = 1 AND NOT r.released AND r.expires_at > now()
        RETURNING r.namespace, r.key, r.state, r.fingerprint, r.lease_token, r.released,
            r.fencing_token, r.attempts, r.holder, r.retention_us, r.revision, r.created_at,
            r.lease_expires_at, r.completed_at, r.expires_at, r.result_body, r.result_code,
            r.result_meta_keys, r.result_meta_values, now(),
            CASE WHEN r.has_waiters
                THEN (SELECT true FROM pg_notify('idemd_changes', r.namespace || '/' || r.key))
            END,
            i - 1;
    END LOOP;
END
$$;
