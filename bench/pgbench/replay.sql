-- An Acquire of an already-completed key: the insert conflicts, the stored row is read.
\set i random(1, 10000)
WITH ins AS (
    INSERT INTO peer_idem (namespace, key, state, fingerprint, lease_token, lease_expires_at)
    VALUES ('bench', 'seed-' || :i, 1, 'fp', md5(random()::text), now() + interval '30 seconds')
    ON CONFLICT (namespace, key) DO NOTHING
    RETURNING state, response)
SELECT state, response FROM ins
UNION ALL
SELECT state, response FROM peer_idem
WHERE namespace = 'bench' AND key = 'seed-' || :i AND NOT EXISTS (SELECT 1 FROM ins);
