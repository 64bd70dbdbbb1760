-- r0003: the run-status vocabulary once (runops.run_statuses and the constants the hot
-- paths inline), a CHECK on runs.status, and views that ask the vocabulary and the classifier.
-- 00_freshness.sql names every lock this file needs (runs and the views' tables), taken all or none.

CREATE TABLE runops.run_statuses (
  status       text PRIMARY KEY,
  is_final     boolean NOT NULL,   -- a final run never changes again
  releases_key boolean NOT NULL,   -- a run ending here lets go of its idempotency key (SPEC §4)
  meaning      text NOT NULL,
  CHECK (is_final OR NOT releases_key)
);
INSERT INTO runops.run_statuses (status, is_final, releases_key, meaning) VALUES
  ('DELAYED',                false, false, 'triggered with a delay; becomes PENDING when it is due'),
  ('PENDING',                false, false, 'queued, waiting for a worker'),
  ('PENDING_VERSION',        false, false, 'waiting for a deployed version that has the task'),
  ('WAITING_FOR_DEPLOY',     false, false, 'waiting for a first deploy (legacy engine)'),
  ('DEQUEUED',               false, false, 'locked to a worker under a lease, attempt not started'),
  ('EXECUTING',              false, false, 'an attempt is running'),
  ('WAITING_TO_RESUME',      false, false, 'suspended at a checkpoint until its blockers complete'),
  ('RETRYING_AFTER_FAILURE', false, false, 'an attempt failed; re-queued at retry_at'),
  ('PAUSED',                 false, false, 'held by an operator'),
  ('CANCELED',               true,  false, 'canceled; its key stays held, so a retrigger returns it'),
  ('INTERRUPTED',            true,  true,  'interrupted by the platform'),
  ('COMPLETED_SUCCESSFULLY', true,  false, 'the task returned its output'),
  ('COMPLETED_WITH_ERRORS',  true,  true,  'the task failed (no attempts or retries left)'),
  ('SYSTEM_FAILURE',         true,  true,  'the platform failed it (e.g. it could not be triggered)'),
  ('CRASHED',                true,  true,  'all attempts were used up'),
  ('EXPIRED',                true,  true,  'its ttl ran out before a worker took it'),
  ('TIMED_OUT',              true,  true,  'ran past max_duration');
ALTER TABLE runops.run_statuses OWNER TO runops_owner;

-- The vocabulary's constants, which the CHECK below and the status triggers ask. is_final_status
-- moves here from sql/functions/lifecycle.sql, where r0001 and r0002 made it with this same body.
-- Adjusted since its release: the delta made only the two new ones and relied on the installed
-- is_final_status; an upgrade from an empty database installs no function before head, so the
-- delta makes it too (CREATE OR REPLACE: on an installed store it replaces the same text).
CREATE OR REPLACE FUNCTION runops.is_final_status(status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT status IN ('CANCELED', 'INTERRUPTED', 'COMPLETED_SUCCESSFULLY', 'COMPLETED_WITH_ERRORS',
                    'SYSTEM_FAILURE', 'CRASHED', 'EXPIRED', 'TIMED_OUT')
$$;
ALTER FUNCTION runops.is_final_status(text) OWNER TO runops_owner;
CREATE FUNCTION runops.is_run_status(status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN status IN ('DELAYED', 'PENDING', 'PENDING_VERSION', 'WAITING_FOR_DEPLOY', 'DEQUEUED', 'EXECUTING',
                  'WAITING_TO_RESUME', 'RETRYING_AFTER_FAILURE', 'PAUSED', 'CANCELED', 'INTERRUPTED',
                  'COMPLETED_SUCCESSFULLY', 'COMPLETED_WITH_ERRORS', 'SYSTEM_FAILURE', 'CRASHED', 'EXPIRED',
                  'TIMED_OUT');
ALTER FUNCTION runops.is_run_status(text) OWNER TO runops_owner;
CREATE FUNCTION runops.status_releases_key(status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN status IN ('INTERRUPTED', 'COMPLETED_WITH_ERRORS', 'SYSTEM_FAILURE', 'CRASHED', 'TIMED_OUT', 'EXPIRED');
ALTER FUNCTION runops.status_releases_key(text) OWNER TO runops_owner;

-- Added NOT VALID, then validated: every existing status is one of the vocabulary's.
ALTER TABLE runops.runs ADD CONSTRAINT runs_status_check CHECK (runops.is_run_status(status)) NOT VALID;
ALTER TABLE runops.runs VALIDATE CONSTRAINT runs_status_check;

CREATE OR REPLACE VIEW runops.run_view AS
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
       r.id
FROM runops.runs r;

CREATE OR REPLACE VIEW runops.waitpoint_view AS
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
