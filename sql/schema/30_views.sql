-- runops.run_view is the row every run-returning function answers with. Ids are friendly.
-- The bare id rides along as the last column so that a read through postgres_fdw can filter
-- on it (id = $1 is pushed down and hits the primary key; 'run_' || id = $1 would not).
CREATE VIEW runops.run_view AS
SELECT 'run_' || r.id                                        AS run_id,
       r.environment_id,
       r.task_identifier,
       r.status,
       CASE WHEN length(r.id) = 25 THEN 'LEGACY' ELSE 'NEW' END AS residency,
       r.created_at,
       r.updated_at,
       r.idempotency_key,
       r.idempotency_key_scope,
       r.idempotency_key_expires_at,
       'run_' || r.parent_run_id                             AS parent_run_id,
       'run_' || r.root_run_id                               AS root_run_id,
       'batch_' || r.batch_id                                AS batch_id,
       r.attempt_number,
       r.max_attempts,
       r.payload,
       r.output,
       r.error,
       r.metadata,
       r.tags,
       r.queue,
       r.concurrency_key,
       r.delay_until,
       r.ttl,
       r.queued_at,
       r.started_at,
       r.completed_at,
       r.expired_at,
       r.locked_by,
       r.lease_expires_at,
       r.max_duration,
       r.dev_session_id,
       r.project_id,
       r.organization_id,
       r.id
FROM runops.runs r;
ALTER VIEW runops.run_view OWNER TO runops_owner;
GRANT SELECT ON runops.run_view TO runops_fdw;
