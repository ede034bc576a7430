-- One row per (namespace, key): the idempotency record and its current lease.
-- Every time column is written from PostgreSQL's now(), never from a replica's clock.

-- Fencing tokens: strictly increasing across every lease ever granted, whatever the key.
CREATE SEQUENCE idemd_fencing_token_seq AS bigint;

CREATE TABLE idemd_records (
    namespace          text        NOT NULL,
    key                text        NOT NULL,
    -- 1 = in progress, 2 = completed
    state              smallint    NOT NULL CHECK (state IN (1, 2)),
    fingerprint        bytea       NOT NULL,
    -- token of the current lease, or of the lease that completed the record (16 random bytes)
    lease_token        bytea       NOT NULL,
    -- the holder gave the lease back with Release
    released           boolean     NOT NULL,
    fencing_token      bigint      NOT NULL,
    attempts           integer     NOT NULL,
    holder             text        NOT NULL,
    retention_us       bigint      NOT NULL CHECK (retention_us > 0),
    -- bumped by every write; guards compare-and-set updates
    revision           bigint      NOT NULL,
    created_at         timestamptz NOT NULL,
    lease_expires_at   timestamptz NOT NULL,
    completed_at       timestamptz,
    expires_at         timestamptz NOT NULL,
    result_body        bytea,
    result_code        integer,
    result_meta_keys   text[],
    result_meta_values text[],
    PRIMARY KEY (namespace, key),
    CHECK (state = 1 OR (completed_at IS NOT NULL AND result_body IS NOT NULL))
);

-- The reaper deletes expired rows in expires_at order.
CREATE INDEX idemd_records_expires_at ON idemd_records (expires_at);
