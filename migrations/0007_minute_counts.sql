-- GetNamespaceStats' per-minute counts of events (proto/idempotency/admin/v1/admin.proto,
-- MinuteCounts). Each replica counts the records created, completed and taken over as it answers
-- them, in memory, and about once a second adds its counts into this table in one statement
-- (never inside a data-plane transaction). GetNamespaceStats reads at most 1,440 rows of one
-- namespace instead of scanning its records. The reaper deletes rows older than 25 hours.
CREATE TABLE idemd_minute_counts (
    namespace  text        NOT NULL,
    -- start of the minute (UTC, the database's clock)
    minute     timestamptz NOT NULL,
    created    bigint      NOT NULL DEFAULT 0,
    completed  bigint      NOT NULL DEFAULT 0,
    taken_over bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, minute)
);

-- The reaper's delete of old minutes, whatever the namespace.
CREATE INDEX idemd_minute_counts_minute ON idemd_minute_counts (minute);

-- The last flush each replica (a random id per process) applied. A flush whose answer was lost
-- (the connection failed after the commit) is sent again with the same sequence number and then
-- adds nothing: counts are added exactly once. Rows of replicas silent for 25 hours are reaped.
CREATE TABLE idemd_count_flushes (
    replica bigint      PRIMARY KEY,
    seq     bigint      NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
