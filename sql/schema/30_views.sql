-- runops.run_view is the row every run-returning function answers with. Ids are friendly.
-- The bare id rides along as the last column so that a read through postgres_fdw can filter
-- on it (id = $1 is pushed down and hits the primary key; 'run_' || id = $1 would not).
-- residency is this store's, rendered at install like local_residency(): the id-shape CHECK
-- (the classifier's rule for this store) admits no other, and a read through the FDW evaluates
-- the view in the store that holds the row.
CREATE VIEW runops.run_view AS
SELECT 'run_' || r.id                                        AS run_id,
       r.environment_id,
       r.task_identifier,
       r.status,
       'RESIDENCY_OF_THIS_STORE'::text                       AS residency,
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
       r.retry_at,
       r.suspended_reason,
       r.project_id,
       r.organization_id,
       'run_' || r.replayed_from_run_id                      AS replayed_from_run_id,
       r.id
FROM runops.runs r;
ALTER VIEW runops.run_view OWNER TO runops_owner;
GRANT SELECT ON runops.run_view TO runops_fdw;

-- The row list_runs answers with: a run-view row and the cursor that resumes after it. (A view
-- that is never read, so the row type follows run_view without repeating its columns.)
CREATE VIEW runops.run_page_row AS SELECT v.*, NULL::text AS cursor FROM runops.run_view AS v WHERE false;
ALTER VIEW runops.run_page_row OWNER TO runops_owner;

-- runops.waitpoint_view: every waitpoint a caller can name. DATETIME and MANUAL waitpoints are
-- rows; a RUN waitpoint is derived from its run and a BATCH waitpoint from its batch (same bare
-- id), so an edge on one is satisfied by reading the owner, from either store, and it never
-- needs completing by hand. No column compares
-- times: a remote store's clock must never decide (the caller compares completed_after itself).
CREATE VIEW runops.waitpoint_view AS
SELECT 'waitpoint_' || w.id AS waitpoint_id,
       w.environment_id,
       w.type,
       w.status,
       w.output,
       w.output_is_error,
       w.completed_at,
       w.completed_after,
       w.idempotency_key,
       w.timeout_at,
       w.id
FROM runops.waitpoints AS w
UNION ALL
SELECT 'waitpoint_' || r.id,
       r.environment_id,
       'RUN',
       CASE WHEN s.is_final THEN 'COMPLETED' ELSE 'PENDING' END,
       CASE WHEN r.status = 'COMPLETED_SUCCESSFULLY' THEN r.output ELSE r.error END,
       s.is_final AND r.status <> 'COMPLETED_SUCCESSFULLY',
       r.completed_at,
       NULL::timestamptz,
       NULL::text,
       NULL::timestamptz,
       r.id
FROM runops.runs AS r
-- Asks the vocabulary table (read with the view owner's rights, so the other store's FDW login
-- needs no grant on it).
JOIN runops.run_statuses AS s ON s.status = r.status
UNION ALL
SELECT 'waitpoint_' || b.id,
       b.environment_id,
       'BATCH',
       CASE WHEN b.status IN ('COMPLETED', 'ABORTED') THEN 'COMPLETED' ELSE 'PENDING' END,
       b.output,
       b.status = 'ABORTED',
       b.completed_at,
       NULL::timestamptz,
       NULL::text,
       NULL::timestamptz,
       b.id
FROM runops.batches AS b;
ALTER VIEW runops.waitpoint_view OWNER TO runops_owner;
GRANT SELECT ON runops.waitpoint_view TO runops_fdw;
