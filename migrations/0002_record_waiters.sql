-- Set by a Wait on an in-progress record, so that only Completes and Releases that someone is
-- waiting for send a NOTIFY (NOTIFY serialises commits on a global queue lock: not for free).
ALTER TABLE idemd_records ADD COLUMN has_waiters boolean NOT NULL DEFAULT false;
