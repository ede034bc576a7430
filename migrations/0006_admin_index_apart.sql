-- Migration 0005's ListRecords index began with `namespace`, so the planner could also reach a
-- record through it by namespace alone, with the key as a filter. On a new (or emptied) table it
-- did so for the data plane's statements: Get, Complete, the Acquire's read of an existing record
-- and the batched Complete, whose generic plans every pooled connection keeps until the table is
-- next analysed. Until autovacuum came by, each of them read every record of its namespace: a
-- new database served fresh pairs 40 % slower for its first seconds, and a plan made on an
-- empty table would keep doing it as the table grows.
--
-- The same index with the namespace in the "C" collation serves only statements that compare
-- namespaces in that collation (the admin API's listing, `namespace COLLATE "C" = $1`). The data
-- plane's `namespace = $1` compares in the database's collation, which this index cannot serve,
-- so its only way to a record is the primary key. Equality on text is the same in both
-- collations (both deterministic): only the choice of index changes.
DROP INDEX idemd_records_namespace_created;
CREATE INDEX idemd_records_namespace_created
    ON idemd_records (namespace COLLATE "C", created_at DESC, key COLLATE "C");
