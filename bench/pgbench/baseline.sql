-- Baseline: a plain single-row INSERT into bench.bench_baseline (the shape and indexes of SPEC §7),
-- with a fresh id and a fresh, non-NULL idempotency key supplied by the client, so every index of
-- the table takes a new entry. Same role (runops_app over TCP), same cluster, same payload.
\set id random(1, 9000000000000000000)
\set k random(1, 9000000000000000000)
INSERT INTO bench.bench_baseline (id, friendly_id, environment_id, task_identifier, status, idempotency_key, payload)
VALUES ('b' || CAST(:id AS text), 'run_b' || CAST(:id AS text), :env, 'bench-task', 'PENDING',
        'k' || CAST(:k AS text), '{"n": 1}');
