-- A root trigger with a key a live run already holds (prefilled r1..r<keys>): the cached path,
-- which reads and returns the holder without minting or writing.
\set k random(1, :keys)
SELECT * FROM runops.trigger_run(:env, 'bench-task', '{"n": 1}',
                                 jsonb_build_object('idempotency_key', 'r' || CAST(:k AS text)));
