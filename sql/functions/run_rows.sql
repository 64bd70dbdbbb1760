-- The one run-row builder: what a new run's row holds, for every writer of new runs (the
-- root fast path of trigger_run, find_or_create_run, batch items). Writers insert its row as is:
--   INSERT INTO runs SELECT * FROM new_run(...)
-- A set-returning SQL function (one row), so PostgreSQL inlines it into the writer's INSERT and
-- folds what is constant there (a root without options costs no call at all); its row type is
-- the table's, so its columns cannot drift from the table's order. PostgreSQL inlines it only
-- when no argument is volatile (mint ids in a sub-select), and an argument is evaluated once per
-- use inside: pass columns, not expressions that parse or cast.
--
--   parent        the parent's row (NULL for a root): a child names it, a batch item its batch's
--   batch_id, batch_index  the batch index the run fills (a member through its own row)
--   spec          the parsed options (NULL: none); its key, parent and batch fields are not
--                 read: those are passed
--   status        the run's first status: PENDING, DELAYED or SYSTEM_FAILURE (a failed task)
--   key, key_hash the caller's key and its dedup key (NULL: the run holds none)
--   at            the caller's runops.now(), read once
CREATE OR REPLACE FUNCTION runops.new_run(id text, env runops.environment_context, parent runops.runs,
                                          batch_id text, batch_index integer,
                                          task_identifier text, payload jsonb, spec runops.trigger_spec,
                                          status text, error jsonb, key text, key_hash text,
                                          key_expires_at timestamptz, at timestamptz)
RETURNS SETOF runops.runs
LANGUAGE sql STABLE
AS $$
  SELECT id, env.id, env.project_id, env.organization_id, task_identifier, status,
         coalesce(payload, '{}'::jsonb), NULL::jsonb, error,
         coalesce(spec.metadata, '{}'::jsonb), coalesce(spec.tags, '{}'::text[]),
         coalesce(spec.queue, 'task/' || task_identifier), spec.concurrency_key,
         CASE WHEN key_hash IS NOT NULL THEN key END, key_hash,
         -- With no parent every scope acts as global, and says so.
         CASE WHEN key_hash IS NOT NULL THEN
           CASE WHEN parent.id IS NULL THEN 'global' ELSE coalesce(spec.idempotency_key_scope, 'run') END
         END,
         CASE WHEN key_hash IS NOT NULL THEN key_expires_at END,
         parent.id, spec.parent_attempt_number, coalesce(parent.root_run_id, parent.id),
         coalesce(parent.depth + 1, 0), coalesce(spec.resume_parent_on_completion, false),
         batch_id, batch_index, 0, coalesce(spec.max_attempts, runops.default_max_attempts()),
         CASE WHEN status = 'DELAYED' THEN spec.delay_until END, spec.ttl, spec.max_duration,
         spec.dev_session_id,
         NULL::text, NULL::interval, NULL::timestamptz, NULL::timestamptz,           -- no lease, no retry
         CASE WHEN status = 'PENDING' THEN at + spec.ttl END,                         -- ttl_expires_at
         NULL::timestamptz, NULL::text,                                               -- no deadline, not suspended
         CASE WHEN status = 'PENDING' THEN at END,                                    -- queued_at
         NULL::timestamptz,                                                           -- started_at
         CASE WHEN status = 'SYSTEM_FAILURE' THEN at END,                             -- completed_at
         NULL::timestamptz, at, at,                                                   -- expired_at, created, updated
         NULL::text                                                                   -- replayed_from_run_id: replay_run sets it
$$;

-- The options of a run that passed none (what parse_trigger_options answers for '{}'), as a
-- constant the planner folds into new_run.
CREATE OR REPLACE FUNCTION runops.no_options()
RETURNS runops.trigger_spec
LANGUAGE sql IMMUTABLE
AS $$
  SELECT ROW(NULL, 'run', runops.default_idempotency_key_ttl(), NULL, NULL, false, NULL, NULL, NULL, NULL, NULL,
             '{}'::text[], runops.default_max_attempts(), '{}'::jsonb, NULL, NULL, NULL, NULL)::runops.trigger_spec
$$;
