-- The "do it yourself" peer: a service's own idempotency table, one statement per request
-- (the V1 design of shared/reference/pg-limit.md).
DROP TABLE IF EXISTS peer_idem;
CREATE TABLE peer_idem (
    namespace        text        NOT NULL,
    key              text        NOT NULL,
    state            smallint    NOT NULL,
    fingerprint      bytea       NOT NULL,
    lease_token      text        NOT NULL,
    lease_expires_at timestamptz NOT NULL,
    response         bytea,
    PRIMARY KEY (namespace, key)
);
-- Completed keys for the replay workload.
INSERT INTO peer_idem
SELECT 'bench', 'seed-' || i, 2, 'fp', md5(i::text), now(), repeat('x', 128)::bytea
FROM generate_series(1, 10000) AS i;
VACUUM ANALYZE peer_idem;
