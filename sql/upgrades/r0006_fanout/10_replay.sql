-- r0006, replay (SPEC §9 Replay [1.3]): a run records the run it replays, run_view shows it,
-- and replay_run's row type.
--
-- ADD COLUMN without a default rewrites nothing. run_view keeps the bare id last (a read through
-- postgres_fdw filters on it), so the new column goes before it: a view's columns can only be
-- appended by CREATE OR REPLACE, hence the drop. CASCADE also drops run_page_row (recreated here)
-- and the functions returning either row type (dequeue_runs, get_run, list_runs, the lifecycle
-- calls, ...): the repeatable step re-creates them, with their grants, in this same transaction.
-- A wired store's foreign tables of the other store keep their columns until `runops migrate`
-- re-wires the pair, which it does right after upgrading both.
-- lock: runops.runs
ALTER TABLE runops.runs ADD COLUMN replayed_from_run_id text;

DROP VIEW runops.run_view CASCADE;
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

CREATE VIEW runops.run_page_row AS SELECT v.*, NULL::text AS cursor FROM runops.run_view AS v WHERE false;
ALTER VIEW runops.run_page_row OWNER TO runops_owner;

-- What replay_run answers with: trigger_run's row (its parameter is named run_id too).
CREATE TYPE runops.replayed_run AS (run_id text, is_cached boolean, status text, residency text);
ALTER TYPE runops.replayed_run OWNER TO runops_owner;
