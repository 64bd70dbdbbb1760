-- graphile-worker's SQL enqueue of one job without a job_key (it notifies 'jobs:insert').
SELECT id FROM graphile_worker.add_job('bench-task', '{"n": 1}'::json);
