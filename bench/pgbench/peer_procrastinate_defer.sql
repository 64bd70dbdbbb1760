-- Procrastinate's defer of one job, as its defer() sends it (queries.sql "defer_jobs"): the
-- procrastinate_defer_jobs_v1 function with one job, no lock, no queueing lock. Its insert
-- trigger notifies the queue's listeners, as runops's triggers notify theirs.
SELECT unnest(procrastinate_defer_jobs_v1(
  ARRAY[ROW('default', 'bench-task', 0, NULL, NULL, '{"n": 1}', NULL)::procrastinate_job_to_defer_v1])) AS id;
