-- A root trigger with no idempotency key: validates, decides residency, loads the environment,
-- mints a KSUID and inserts one run.
SELECT * FROM runops.trigger_run(:env, 'bench-task', '{"n": 1}', '{}');
