-- One fresh Acquire + Complete pair: insert-or-read, then the guarded completion.
\set k random(1, 9000000000000000)
WITH ins AS (
    INSERT INTO peer_idem (namespace, key, state, fingerprint, lease_token, lease_expires_at)
    VALUES ('bench', :client_id || '-' || :k, 1, 'fp', md5(:k::text), now() + interval '30 seconds')
    ON CONFLICT (namespace, key) DO NOTHING
    RETURNING state, lease_token)
SELECT state, lease_token FROM ins
UNION ALL
SELECT state, lease_token FROM peer_idem
WHERE namespace = 'bench' AND key = :client_id || '-' || :k AND NOT EXISTS (SELECT 1 FROM ins);
UPDATE peer_idem SET state = 2, response = convert_to(repeat('x', 128), 'UTF8'), lease_expires_at = now()
WHERE namespace = 'bench' AND key = :client_id || '-' || :k AND lease_token = md5(:k::text) AND state = 1;
