//! Every SQL text the PostgreSQL store runs; only the schema's own definition is elsewhere, in the
//! numbered files under `migrations/` that `migrate` applies. Each hot-path statement decides in
//! one round trip; their guards are the SQL image of the decision functions in `crate::domain`:
//!
//! * "live record"           = `expires_at > now()`
//! * "lease held by token"   = `lease_token = $token AND state = 1 AND NOT released`
//!
//! Time always comes from `now()`; durations travel as microseconds.

/// Columns read into a `domain::Record`, in the order `super::row::record_from_row` expects.
macro_rules! record_columns {
    () => {
        "namespace, key, state, fingerprint, lease_token, released, fencing_token, attempts, \
         holder, retention_us, revision, created_at, lease_expires_at, completed_at, expires_at, \
         result_body, result_code, result_meta_keys, result_meta_values"
    };
}

/// The LISTEN/NOTIFY channel of record changes.
macro_rules! changes_channel {
    () => {
        "idemd_changes"
    };
}

/// Wakes Waits on every replica, only when a Wait marked the record (see migration 0002). The
/// payload is `namespace/key`; namespaces cannot contain `/`. Delivered at commit.
macro_rules! notify_waiters {
    () => {
        concat!(
            "CASE WHEN has_waiters THEN pg_notify('",
            changes_channel!(),
            "', namespace || '/' || key) END"
        )
    };
}

/// The database's time, when there is no row to read it from.
pub const DB_NOW: &str = "SELECT now()";

/// Marks an in-progress record as waited on, so its Complete or Release notifies. It leaves the
/// revision alone on purpose: the flag plays no part in any decision, so it must not make a
/// concurrent compare-and-set fail.
pub const MARK_WAITED_ON: &str = "UPDATE idemd_records SET has_waiters = true
    WHERE namespace = $1 AND key = $2 AND state = 1 AND NOT has_waiters";

/// Index of the first column after `record_columns!()`.
pub const AFTER_RECORD: usize = 19;

/// What a completing statement returns of the record: the columns the Complete command does not
/// itself carry, in the order `super::row::completed_record` expects. The result (which may be
/// large), the key and the token are the command's own: sending them back would only cost the
/// database, the wire and the decoding.
macro_rules! completed_columns {
    () => {
        "fingerprint, fencing_token, attempts, holder, retention_us, revision, created_at, \
         lease_expires_at, completed_at, expires_at"
    };
}

/// Index of the first column after `completed_columns!()`.
pub const AFTER_COMPLETED: usize = 10;

/// What an inserting Acquire returns of the new record: the columns PostgreSQL chose, in the
/// order `super::row::inserted_record` expects; the rest is the command's own.
macro_rules! inserted_columns {
    () => {
        "lease_token, fencing_token, created_at, lease_expires_at, expires_at"
    };
}

/// Acquire, first step: insert a new in-progress record, or return the existing one.
/// $1 namespace, $2 key, $3 fingerprint, $4 lease token, $5 holder, $6 lease_ttl µs,
/// $7 retention µs. Returns the record, `created`, and the database time.
///
/// When a concurrent transaction inserts the same key and commits while this statement runs,
/// the INSERT waits for it and does nothing, and the SELECT reads the statement's older snapshot:
/// no row comes back. The store then runs the statement again, and the new snapshot sees the row.
pub const ACQUIRE_INSERT_OR_GET: &str = concat!(
    "WITH inserted AS (
        INSERT INTO idemd_records (namespace, key, state, fingerprint, lease_token, released,
            fencing_token, attempts, holder, retention_us, revision, created_at,
            lease_expires_at, expires_at)
        VALUES ($1, $2, 1, $3, $4, false, nextval('idemd_fencing_token_seq'), 1, $5, $7, 1,
            now(), now() + $6::bigint * interval '1 microsecond',
            now() + ($6::bigint + $7::bigint) * interval '1 microsecond')
        ON CONFLICT (namespace, key) DO NOTHING
        RETURNING ",
    record_columns!(),
    ")
    SELECT ",
    record_columns!(),
    ", true AS created, now() AS db_now FROM inserted
    UNION ALL
    SELECT ",
    record_columns!(),
    ", false AS created, now() AS db_now FROM idemd_records
    WHERE namespace = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM inserted)"
);

/// Acquire, second step when the existing record can be taken over (`$8 = false`) or has
/// expired and is replaced by a fresh one (`$8 = true`; also when its retention ran out between
/// the two statements, as the `CASE`s re-check). A compare-and-set on the fencing token
/// and revision seen by the first step: if anyone wrote the row since, nothing matches and the
/// store decides again. The fencing token is unique across all rows ever, so a reaped and
/// re-created row cannot be mistaken for the one that was decided on. The new token is above the
/// row's own even if the sequence is not (a sequence restored behind its table's rows, say): a
/// key's tokens only ever grow.
/// $1..$7 as for `ACQUIRE_INSERT_OR_GET`, $8 replace, $9 expected fencing token,
/// $10 expected revision.
pub const ACQUIRE_GRANT: &str = concat!(
    "UPDATE idemd_records SET
        state = 1, fingerprint = $3, lease_token = $4, released = false,
        fencing_token = GREATEST(nextval('idemd_fencing_token_seq'), fencing_token + 1),
        attempts = CASE WHEN $8 OR expires_at <= now() THEN 1
            ELSE LEAST(attempts::bigint + 1, 2147483647)::integer END,
        holder = $5, retention_us = $7, revision = revision + 1,
        created_at = CASE WHEN $8 OR expires_at <= now() THEN now() ELSE created_at END,
        lease_expires_at = now() + $6::bigint * interval '1 microsecond',
        completed_at = NULL,
        expires_at = now() + ($6::bigint + $7::bigint) * interval '1 microsecond',
        result_body = NULL, result_code = NULL, result_meta_keys = NULL, result_meta_values = NULL,
        has_waiters = has_waiters AND NOT ($8 OR expires_at <= now())
    WHERE namespace = $1 AND key = $2 AND fencing_token = $9 AND revision = $10
    RETURNING ",
    record_columns!(),
    ", now() AS db_now"
);

/// Complete with the current lease (live or expired, not released, record live).
/// $1 namespace, $2 key, $3 lease token, $4 body, $5 code, $6 metadata keys, $7 metadata values,
/// $8 retention µs or NULL for the retention given at Acquire. Returns `completed_columns!()`, the
/// database time and the NOTIFY's (empty) value.
pub const COMPLETE: &str = concat!(
    "UPDATE idemd_records SET
        state = 2, result_body = $4, result_code = $5,
        result_meta_keys = $6, result_meta_values = $7,
        retention_us = COALESCE($8::bigint, retention_us),
        completed_at = now(),
        expires_at = now() + COALESCE($8::bigint, retention_us) * interval '1 microsecond',
        revision = revision + 1
    WHERE namespace = $1 AND key = $2 AND lease_token = $3
        AND state = 1 AND NOT released AND expires_at > now()
    RETURNING ",
    completed_columns!(),
    ", now() AS db_now, ",
    notify_waiters!()
);

/// Release the current lease: the key is free from now on, and the record expires after its
/// retention unless someone acquires it. $1 namespace, $2 key, $3 lease token.
pub const RELEASE: &str = concat!(
    "UPDATE idemd_records SET
        released = true, lease_expires_at = now(),
        expires_at = now() + retention_us * interval '1 microsecond',
        revision = revision + 1
    WHERE namespace = $1 AND key = $2 AND lease_token = $3
        AND state = 1 AND NOT released AND expires_at > now()
    RETURNING revision, ",
    notify_waiters!()
);

/// Renew the current lease to now + $4 µs. $1 namespace, $2 key, $3 lease token.
pub const RENEW: &str = concat!(
    "UPDATE idemd_records SET
        lease_expires_at = now() + $4::bigint * interval '1 microsecond',
        expires_at = now() + ($4::bigint + retention_us) * interval '1 microsecond',
        revision = revision + 1
    WHERE namespace = $1 AND key = $2 AND lease_token = $3
        AND state = 1 AND NOT released AND expires_at > now()
    RETURNING ",
    record_columns!(),
    ", now() AS db_now"
);

/// Read one record, live or not, with the database time. $1 namespace, $2 key.
pub const GET: &str = concat!(
    "SELECT ",
    record_columns!(),
    ", now() AS db_now FROM idemd_records WHERE namespace = $1 AND key = $2"
);

/// Who the server is and whether it takes writes (see `super::identity`): its system identifier,
/// its timeline, whether it is read-only (a standby, or `default_transaction_read_only`), whether
/// the fencing sequence exists (not before migrations) and its last value (NULL before the first
/// token). A primary's
/// timeline is read from the name of the WAL file it writes now: `pg_control_checkpoint()` would
/// give the previous timeline until the first checkpoint after a promotion, which PostgreSQL
/// spreads over minutes. A standby cannot name its WAL insert position; it reports the timeline of
/// its last restartpoint. None of these functions needs a superuser.
pub const SERVER_IDENTITY: &str = "SELECT
        (SELECT system_identifier FROM pg_control_system()),
        CASE WHEN pg_is_in_recovery()
            THEN (SELECT timeline_id FROM pg_control_checkpoint())::bigint
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
        END,
        pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean,
        to_regclass('idemd_fencing_token_seq') IS NOT NULL,
        pg_sequence_last_value(to_regclass('idemd_fencing_token_seq'))";

/// Session-independent key of the transaction-scoped advisory lock under which a replica raises
/// the fencing sequence to its timeline's floor ("idemd" + 3).
pub const FENCING_FLOOR_LOCK_KEY: i64 = 0x6964_656d_6400_0003;

/// Takes the fencing-floor lock ($1 `FENCING_FLOOR_LOCK_KEY`) until the transaction ends.
pub const FENCING_FLOOR_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

/// Raises the fencing sequence to $1 (so that the next token is $1) unless it is there already;
/// run under `FENCING_FLOOR_LOCK` (see `super::identity::fencing_floor`).
pub const FENCING_FLOOR: &str = "SELECT setval('idemd_fencing_token_seq', $1, false) \
    FROM idemd_fencing_token_seq WHERE last_value < $1";

/// Session-independent key of the session-level advisory lock held while migrating ("idemd" + 1).
pub const MIGRATION_LOCK_KEY: i64 = 0x6964_656d_6400_0001;

/// Waits for the migration lock ($1 `MIGRATION_LOCK_KEY`): one replica migrates at a time.
pub const MIGRATION_LOCK: &str = "SELECT pg_advisory_lock($1)";

/// Gives the migration lock back ($1 `MIGRATION_LOCK_KEY`).
pub const MIGRATION_UNLOCK: &str = "SELECT pg_advisory_unlock($1)";

/// The table of applied migrations, created before the first one runs.
pub const CREATE_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS idemd_schema_migrations (
        version    integer PRIMARY KEY,
        name       text NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now()
    )";

/// The latest migration applied (0 if none); fails with UNDEFINED_TABLE if the database was
/// never migrated.
pub const SCHEMA_VERSION: &str = "SELECT COALESCE(max(version), 0) FROM idemd_schema_migrations";

/// Records a migration as applied, in its transaction. $1 version, $2 name.
pub const RECORD_MIGRATION: &str =
    "INSERT INTO idemd_schema_migrations (version, name) VALUES ($1, $2)";

/// Planner estimate of live rows by state: cheap (no scan), refreshed by (auto)ANALYZE. Returns
/// the table's estimated rows, the most common values of `state` as text (`{1,2}`), and their
/// frequencies.
pub const RECORD_ESTIMATE: &str = "SELECT
        COALESCE((SELECT reltuples FROM pg_class
                  WHERE oid = to_regclass('idemd_records')), 0)::float8,
        (SELECT most_common_vals::text FROM pg_stats
         WHERE schemaname = current_schema() AND tablename = 'idemd_records' AND attname = 'state'),
        (SELECT most_common_freqs FROM pg_stats
         WHERE schemaname = current_schema() AND tablename = 'idemd_records' AND attname = 'state')";

/// Session-independent key of the reaper's transaction-scoped advisory lock ("idemd" + 2).
pub const REAPER_LOCK_KEY: i64 = 0x6964_656d_6400_0002;

/// Only the replica holding the reaper lock reaps. Returns whether this one got it.
pub const REAPER_TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock($1)";

/// Delete up to $3 expired records among the table's blocks $1 (inclusive) to $2 (exclusive),
/// skipping rows another transaction is writing (an Acquire may be replacing one right now; the
/// outer guard re-checks expiry on the row version the DELETE sees). There is no index on
/// `expires_at` (migration 0004): it made every Complete a non-HOT update. The reaper sweeps the
/// table a range of blocks at a time instead (a TID range scan), so each round costs the same
/// whatever the table's size. Returns how many expired rows the range offered (the limit reached
/// means there may be more), how many were deleted, and the table's size in blocks.
pub const REAP_RANGE: &str = "WITH doomed AS (
        SELECT namespace, key FROM idemd_records
        WHERE ctid >= format('(%s,0)', $1::bigint)::tid
            AND ctid < format('(%s,0)', $2::bigint)::tid
            AND expires_at <= now()
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM idemd_records AS r USING doomed AS d
        WHERE r.namespace = d.namespace AND r.key = d.key AND r.expires_at <= now()
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM doomed), (SELECT count(*) FROM gone),
        pg_relation_size('idemd_records') / current_setting('block_size')::bigint";

/// Acquire for a batch (see `super::batch`): insert a new in-progress record for every input row
/// whose key has none, in the order given (the batcher sorts by namespace and key, so concurrent
/// batches wait for each other's inserts in one global order and cannot deadlock). Arrays:
/// $1 namespaces, $2 keys, $3 fingerprints, $4 lease tokens, $5 holders, $6 lease_ttl µs,
/// $7 retention µs. Returns `inserted_columns!()` and the database time of every inserted row
/// (its lease token names its input row); an input row whose key exists (or repeats an earlier
/// input row) returns nothing, and the store decides it one by one.
pub const ACQUIRE_BATCH: &str = concat!(
    "INSERT INTO idemd_records (namespace, key, state, fingerprint, lease_token, released,
        fencing_token, attempts, holder, retention_us, revision, created_at,
        lease_expires_at, expires_at)
    SELECT i.namespace, i.key, 1, i.fingerprint, i.lease_token, false,
        nextval('idemd_fencing_token_seq'), 1, i.holder, i.retention_us, 1, now(),
        now() + i.lease_ttl_us * interval '1 microsecond',
        now() + (i.lease_ttl_us + i.retention_us) * interval '1 microsecond'
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::text[], $6::int8[],
                $7::int8[]) WITH ORDINALITY
        AS i(namespace, key, fingerprint, lease_token, holder, lease_ttl_us, retention_us, position)
    ORDER BY i.position
    ON CONFLICT (namespace, key) DO NOTHING
    RETURNING ",
    inserted_columns!(),
    ", now() AS db_now"
);

/// Complete for a batch: the same guard as `COMPLETE`, as one set-based UPDATE by primary key in
/// one statement and one commit (the function is migration 0003). Arrays: $1 namespaces, $2 keys,
/// $3 lease tokens, $4 bodies, $5 codes, $6 metadata names and $7 values of all rows flattened,
/// $8 where each row's metadata start in them (1-based) and $9 how many they are, $10 retention µs
/// (NULL: keep). Returns `completed_columns!()`, the database time, whether it notified, and the
/// input position, for each input row it applied (the function returns every column; only these
/// travel back); an input row whose lease is not held (or which
/// repeats an earlier input row's key) returns nothing.
pub const COMPLETE_BATCH: &str = concat!(
    "SELECT ",
    completed_columns!(),
    ", db_now, notified, input_position \
    FROM idemd_complete_batch($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::int4[], \
        $6::text[], $7::text[], $8::int4[], $9::int4[], $10::int8[])"
);

// ---- The admin API (see `super::admin`) ----

/// The channel that tells every replica to drop a purged record from its replay cache. Payload:
/// `<audit id> <namespace>/<key>`, or `<audit id> *` for every record (a bulk purge).
macro_rules! invalidate_channel {
    () => {
        "idemd_invalidate"
    };
}

/// The channel on which each replica's listener acknowledges an invalidation it applied.
/// Payload: `<audit id>`; the notification's process id names the listener's session.
macro_rules! invalidated_channel {
    () => {
        "idemd_invalidated"
    };
}

/// Subscribes the listener's connection to record changes, invalidations and their
/// acknowledgements (see `super::listener`).
pub const LISTEN_ALL: &str = concat!(
    "LISTEN ",
    changes_channel!(),
    "; LISTEN ",
    invalidate_channel!(),
    "; LISTEN ",
    invalidated_channel!()
);

/// The channel names, for the listener's dispatch.
pub const CHANGES_CHANNEL: &str = changes_channel!();
pub const INVALIDATE_CHANNEL: &str = invalidate_channel!();
pub const INVALIDATED_CHANNEL: &str = invalidated_channel!();

/// `application_name` of a listener session once it listens: how a purging replica finds the
/// sessions whose acknowledgements it waits for.
pub const LISTENER_APPLICATION_NAME: &str = "idemd-listener";

/// Names the listener's session as listening (after its LISTEN succeeded).
pub const MARK_LISTENING: &str = "SET application_name = 'idemd-listener'";

/// Sends an invalidation, delivered at commit. $1 payload.
pub const NOTIFY_INVALIDATE: &str = concat!("SELECT pg_notify('", invalidate_channel!(), "', $1)");

/// Acknowledges an invalidation. $1 the audit id as text.
pub const NOTIFY_INVALIDATED: &str =
    concat!("SELECT pg_notify('", invalidated_channel!(), "', $1)");

/// Wakes every replica's Waits on one key, delivered at commit. $1 namespace, $2 key.
pub const NOTIFY_CHANGED: &str = concat!(
    "SELECT pg_notify('",
    changes_channel!(),
    "', $1::text || '/' || $2::text)"
);

/// The listener sessions of this database (see `LISTENER_APPLICATION_NAME`).
pub const LISTENER_SESSIONS: &str = "SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = $1";

/// Ends a listener session that did not acknowledge an invalidation in time: its replica stops
/// answering from its cache until it listens again, and then starts with an empty cache. $1 pid.
pub const TERMINATE_LISTENER: &str = "SELECT pg_terminate_backend($1)";

/// The record filter of ListRecords and PurgeRecords, the SQL image of
/// `domain::admin::RecordFilter::matches` on live records: $1 namespace (compared in the "C"
/// collation, the only one `idemd_records_namespace_created` serves: see migration 0006), $2
/// states (smallint[], empty: all), $3 key prefix, $4 holder (NULL: any), $5 stuck only, $6 created after (NULL:
/// unbounded), $7 created before (NULL: unbounded).
macro_rules! record_filter {
    () => {
        "namespace COLLATE \"C\" = $1 AND expires_at > now()
        AND (cardinality($2::smallint[]) = 0 OR state = ANY($2::smallint[]))
        AND starts_with(key, $3::text)
        AND ($4::text IS NULL OR holder = $4::text)
        AND (NOT $5::boolean OR (state = 1 AND NOT released AND lease_expires_at <= now()))
        AND ($6::timestamptz IS NULL OR created_at > $6::timestamptz)
        AND ($7::timestamptz IS NULL OR created_at < $7::timestamptz)"
    };
}

/// The first page of ListRecords in the order (created_at descending, key ascending byte-wise),
/// at most $8 rows. The index `idemd_records_namespace_created` (migrations 0005 and 0006) serves
/// the order.
pub const LIST_RECORDS_FIRST: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM idemd_records WHERE ",
    record_filter!(),
    " ORDER BY namespace COLLATE \"C\", created_at DESC, key COLLATE \"C\" LIMIT $8"
);

/// A later page of ListRecords: the rows after the position ($9 created_at, $10 key), at most $8.
/// `created_at <= $9` is written out on its own so that the index scan starts at the position
/// instead of filtering every row of the earlier pages again.
pub const LIST_RECORDS_AFTER: &str = concat!(
    "SELECT ",
    record_columns!(),
    " FROM idemd_records WHERE ",
    record_filter!(),
    " AND created_at <= $9::timestamptz
        AND (created_at < $9::timestamptz OR key COLLATE \"C\" > $10::text)
    ORDER BY namespace COLLATE \"C\", created_at DESC, key COLLATE \"C\" LIMIT $8"
);

/// A dry run of PurgeRecords: how many records match, up to $8.
pub const COUNT_MATCHING: &str = concat!(
    "SELECT count(*) FROM (SELECT 1 FROM idemd_records WHERE ",
    record_filter!(),
    " LIMIT $8) AS matching"
);

/// PurgeRecords: deletes up to $8 matching records (re-checked on the version it deletes), waking
/// their Waits. Returns one row per deleted record.
pub const PURGE_MATCHING: &str = concat!(
    "WITH doomed AS (
        SELECT namespace, key FROM idemd_records WHERE ",
    record_filter!(),
    " LIMIT $8 FOR UPDATE
    )
    DELETE FROM idemd_records AS r USING doomed AS d
    WHERE r.namespace = d.namespace AND r.key = d.key
    RETURNING ",
    "CASE WHEN r.has_waiters THEN pg_notify('",
    changes_channel!(),
    "', r.namespace || '/' || r.key) END"
);

/// One record, locked for an admin change, with the database time. $1 namespace, $2 key.
pub const LOCK_RECORD: &str = concat!(
    "SELECT ",
    record_columns!(),
    ", now() AS db_now FROM idemd_records WHERE namespace = $1 AND key = $2 FOR UPDATE"
);

/// PurgeRecord, after `LOCK_RECORD` and the domain's decision. $1 namespace, $2 key.
pub const DELETE_RECORD: &str = "DELETE FROM idemd_records WHERE namespace = $1 AND key = $2";

/// ForceRelease, after `LOCK_RECORD` and the domain's decision: the lease ends now, as a Release
/// would end it, so the holder's token no longer completes or renews, and the next Acquire takes
/// the key over with a new fencing token. $1 namespace, $2 key.
pub const FORCE_RELEASE: &str = concat!(
    "UPDATE idemd_records SET
        released = true, lease_expires_at = now(),
        expires_at = now() + retention_us * interval '1 microsecond',
        revision = revision + 1
    WHERE namespace = $1 AND key = $2
    RETURNING ",
    record_columns!()
);

/// Writes an audit entry in the change's transaction. $1 caller, $2 action, $3 namespace, $4 key,
/// $5 filter, $6 reason, $7 count, $8 state before, $9 fencing token before. Returns its id and
/// time.
pub const INSERT_AUDIT: &str = "INSERT INTO idemd_audit (caller, action, namespace, key, filter,
        reason, count, state_before, fencing_token_before)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    RETURNING id, at";

/// A page of a namespace's audit entries, newest first: $1 namespace, $2 only ids below (NULL:
/// from the newest), $3 at most this many.
pub const LIST_AUDIT: &str = "SELECT id, at, caller, action, namespace, key, filter, reason, count,
        state_before, fencing_token_before
    FROM idemd_audit WHERE namespace = $1 AND ($2::bigint IS NULL OR id < $2::bigint)
    ORDER BY namespace, id DESC LIMIT $3";

/// ListNamespaces: every namespace with live records, counted by state, byte-wise by name.
pub const LIST_NAMESPACES: &str = "SELECT namespace,
        count(*) FILTER (WHERE state = 1),
        count(*) FILTER (WHERE state = 2),
        count(*) FILTER (WHERE state = 1 AND NOT released AND lease_expires_at <= now()),
        min(created_at) FILTER (WHERE state = 1)
    FROM idemd_records WHERE expires_at > now()
    GROUP BY namespace ORDER BY namespace COLLATE \"C\"";

/// GetNamespaceStats: a namespace's per-minute event counts (migration 0007) of the minutes from
/// the one $2 µs before now on: at most 1,441 rows by primary key. The database's time comes first,
/// on a row of its own when no minute has counts. $1 namespace, $2 window µs.
pub const NAMESPACE_STATS: &str = "SELECT n.now, c.minute, c.created, c.completed, c.taken_over
    FROM (SELECT now() AS now) AS n
    LEFT JOIN idemd_minute_counts AS c
        ON c.namespace = $1
        AND c.minute >= date_trunc('minute', n.now - $2::bigint * interval '1 microsecond', 'UTC')";

/// Adds one replica's counts into `idemd_minute_counts`, exactly once per flush: the flush
/// claims its sequence number $2 for replica $1 first, and adds nothing when the replica's last
/// applied flush is not older (a flush sent again after its answer was lost). Rows are added in
/// the order given (sorted by namespace and minute on every replica), so two replicas' flushes
/// lock shared rows in one order and cannot deadlock. Arrays: $3 namespaces, $4 minutes,
/// $5 created, $6 completed, $7 taken over. Returns whether the flush was claimed.
pub const FLUSH_COUNTS: &str = "WITH claimed AS (
        INSERT INTO idemd_count_flushes AS f (replica, seq, at) VALUES ($1, $2, now())
        ON CONFLICT (replica) DO UPDATE SET seq = EXCLUDED.seq, at = EXCLUDED.at
            WHERE f.seq < EXCLUDED.seq
        RETURNING 1
    ), added AS (
        INSERT INTO idemd_minute_counts AS c (namespace, minute, created, completed, taken_over)
        SELECT i.namespace, i.minute, i.created, i.completed, i.taken_over
        FROM unnest($3::text[], $4::timestamptz[], $5::int8[], $6::int8[], $7::int8[])
            WITH ORDINALITY AS i(namespace, minute, created, completed, taken_over, position)
        WHERE EXISTS (SELECT 1 FROM claimed)
        ORDER BY i.position
        ON CONFLICT (namespace, minute) DO UPDATE SET
            created = c.created + EXCLUDED.created,
            completed = c.completed + EXCLUDED.completed,
            taken_over = c.taken_over + EXCLUDED.taken_over
    )
    SELECT EXISTS (SELECT 1 FROM claimed)";

/// The reaper's upkeep of the counts: deletes minutes older than $1 µs, and the flush
/// sequence of replicas silent as long.
pub const REAP_COUNTS: &str = "WITH minutes AS (
        DELETE FROM idemd_minute_counts
        WHERE minute < now() - $1::bigint * interval '1 microsecond'
        RETURNING 1
    ), replicas AS (
        DELETE FROM idemd_count_flushes
        WHERE at < now() - $1::bigint * interval '1 microsecond'
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM minutes), (SELECT count(*) FROM replicas)";
