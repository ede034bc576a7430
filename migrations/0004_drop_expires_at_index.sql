-- The reaper sweeps the table by block ranges instead of walking an index on expires_at. That
-- index made every Complete (which moves expires_at) a non-HOT update: a new index entry in both
-- indexes and more WAL per request. Without it, a Complete of a freshly acquired row is almost
-- always a HOT update.
DROP INDEX IF EXISTS idemd_records_expires_at;
