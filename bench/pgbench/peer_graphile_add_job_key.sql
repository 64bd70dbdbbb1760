-- graphile-worker's SQL enqueue of one job with a job_key no job holds (default mode 'replace':
-- the unique key index is probed and takes an entry), as trigger_new_key.
\set k random(1, 9000000000000000000)
SELECT id FROM graphile_worker.add_job('bench-task', '{"n": 1}'::json, job_key => 'n' || CAST(:k AS text));
