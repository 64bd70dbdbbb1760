-- Procrastinate's defer of one job with a queueing lock no waiting job holds: the partial unique
-- index on queueing_lock takes an entry, as a runops idempotency key does (trigger_new_key).
\set k random(1, 9000000000000000000)
SELECT unnest(procrastinate_defer_jobs_v1(
  ARRAY[ROW('default', 'bench-task', 0, NULL, 'q' || CAST(:k AS text), '{"n": 1}', NULL)::procrastinate_job_to_defer_v1])) AS id;
