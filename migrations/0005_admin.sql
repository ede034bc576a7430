-- The admin API (proto/idempotency/admin/v1/admin.proto).
--
-- Every admin change writes one row here in the same transaction as the change, so a change
-- without its entry cannot exist. Entries are kept: nothing in idemd deletes them.
CREATE TABLE idemd_audit (
    id                   bigserial   PRIMARY KEY,
    at                   timestamptz NOT NULL DEFAULT now(),
    caller               text        NOT NULL,
    -- PurgeRecord, ForceRelease or PurgeRecords
    action               text        NOT NULL,
    namespace            text        NOT NULL,
    -- the key changed; NULL for PurgeRecords
    key                  text,
    -- PurgeRecords' filter, as text; NULL otherwise
    filter               text,
    reason               text        NOT NULL,
    count                bigint      NOT NULL,
    -- the record's state (1 in progress, 2 completed) and fencing token before the change
    state_before         smallint,
    fencing_token_before bigint
);

-- ListAuditEntries: a namespace's entries, newest first.
CREATE INDEX idemd_audit_namespace_id ON idemd_audit (namespace, id DESC);

-- ListRecords: a namespace's records newest first, a keyset page at a time, without sorting the
-- namespace on every page (keys in byte order, as the memory store sorts them). Its cost on the data plane: one more index entry per new record
-- (Acquire's insert). Complete, Renew, Release and takeovers leave created_at alone, so their
-- updates stay HOT-eligible; only replacing an expired record (which moves created_at) is not.
CREATE INDEX idemd_records_namespace_created ON idemd_records (namespace, created_at DESC, key COLLATE "C");
