-- The lean loop: dequeue_runs' start option moves a run PENDING -> EXECUTING in one write
-- (start_attempt's move folded into the dequeue that leases it).
-- lock: runops.status_transitions
INSERT INTO runops.status_transitions (from_status, to_status, made_by)
VALUES ('PENDING', 'EXECUTING', 'dequeue_runs')
ON CONFLICT DO NOTHING;
