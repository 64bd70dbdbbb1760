-- A root trigger with a key no run holds yet: the dedup lookup misses, then a run is inserted
-- holding the key. The key space (9e18) makes a repeat within one run vanishingly unlikely.
\set k random(1, 9000000000000000000)
SELECT * FROM runops.trigger_run(:env, 'bench-task', '{"n": 1}',
                                 jsonb_build_object('idempotency_key', 'n' || CAST(:k AS text)));
