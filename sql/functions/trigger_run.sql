-- Triggering runs (SPEC §4): trigger_run and trigger_failed_task.
--
-- trigger_run = validate_new_run (RO006, bounded_input.sql) -> load_environment (one query, with
--   the split settings) -> decide_residency (RO001, RO006, RO002) -> require_parent (RO004, RO003)
--   -> require_usable (RO004, RO005) -> create_run (idempotency.sql).
-- trigger_failed_task takes the same path (admit_run) to a run born SYSTEM_FAILURE.

-- The parent a child names, in this store and this environment (RO004).
CREATE OR REPLACE FUNCTION runops.require_parent(spec runops.trigger_spec, environment_id text)
RETURNS runops.runs
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  parent runs;
BEGIN
  SELECT * INTO parent FROM runs AS r WHERE r.id = spec.parent_run_id;
  IF NOT FOUND OR parent.environment_id <> require_parent.environment_id THEN
    PERFORM raise_error('RO004', format('parent run run_%s not found in environment %s', spec.parent_run_id,
                                        require_parent.environment_id));
  END IF;
  RETURN parent;
END
$$;

-- A parent that is to wait for its child must be live (RO003, the last check of all).
CREATE OR REPLACE FUNCTION runops.require_waitable_parent(parent runops.runs, waits boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF waits AND parent.id IS NOT NULL AND is_final_status(parent.status) THEN
    PERFORM raise_error('RO003', format('parent run run_%s is %s: a final run cannot wait for a child',
                                        parent.id, parent.status));
  END IF;
END
$$;

-- Trigger-and-wait: the parent waits on the child's RUN waitpoint (the child's id). Parent and
-- child are always in one store (children inherit residency), so the edge is local; it is born
-- done when the child already finished, so the parent never hangs on a cached final run.
CREATE OR REPLACE FUNCTION runops.wait_for_child(spec runops.trigger_spec, parent runops.runs, child_id text,
                                                 child_status text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  IF spec.resume_parent_on_completion AND parent.id IS NOT NULL THEN
    PERFORM add_blocker(parent.id, parent.environment_id, child_id, is_final_status(child_status));
    IF is_final_status(child_status) THEN
      PERFORM resume_if_unblocked(parent.id, false);  -- a parent already suspended goes on at once
    END IF;
  END IF;
END
$$;

-- The one admission of a single run, for trigger_run and trigger_failed_task: every check in
-- the SPEC's order, then the batch index it fills (a re-sent index returns its run), then
-- create_run. initial_status NULL lets create_run choose PENDING or DELAYED.
CREATE OR REPLACE FUNCTION runops.admit_run(environment_id text, task_identifier text, payload jsonb,
                                            options jsonb, initial_status text, error jsonb,
                                            OUT run_id text, OUT is_cached boolean, OUT status text,
                                            OUT residency text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  spec trigger_spec;
  env_id text := admit_run.environment_id;
  task text := admit_run.task_identifier;
  owner_residency text;
  env environment_context;
  parent runs;
  target batches;
  created record;
  existing text;
BEGIN
  spec := validate_new_run(env_id, task, admit_run.payload, admit_run.options);
  IF admit_run.error IS NOT NULL THEN
    PERFORM check_json_bounds(admit_run.error, 'error');
  END IF;
  env := load_environment(env_id);
  owner_residency := decide_residency(env, env_id, spec);
  IF owner_residency <> local_residency() THEN
    PERFORM raise_wrong_store('a new run of environment', env_id, store_for_residency(owner_residency));
  END IF;
  IF spec.parent_run_id IS NOT NULL THEN
    parent := require_parent(spec, env_id);
  END IF;
  IF spec.batch_id IS NOT NULL THEN
    target := lock_batch_for_index(spec, env_id);
  END IF;
  -- Admitted like any other run (SPEC §3 [1.2]): an environment that takes no new work is RO005.
  env := require_usable(env, env_id);
  PERFORM require_waitable_parent(parent, spec.resume_parent_on_completion);
  IF spec.batch_id IS NOT NULL THEN
    existing := claim_batch_index(target, spec);
    IF existing IS NOT NULL THEN
      SELECT 'run_' || r.id, true, r.status, local_residency() INTO run_id, is_cached, status, residency
      FROM runs AS r WHERE r.id = existing;
      RETURN;
    END IF;
  END IF;
  created := create_run(env, parent, task, admit_run.payload, spec, initial_status, admit_run.error);
  IF spec.batch_id IS NOT NULL THEN
    PERFORM attach_batch_item(spec.batch_id, spec.batch_index, substr(created.run_id, 5));
  END IF;
  run_id := created.run_id;
  is_cached := created.is_cached;
  status := created.status;
  residency := created.residency;  -- a cached holder may live in the other store
END
$$;

CREATE OR REPLACE FUNCTION runops.trigger_run(environment_id text, task_identifier text,
                                              payload jsonb DEFAULT '{}', options jsonb DEFAULT '{}')
RETURNS TABLE (run_id text, is_cached boolean, status text, residency text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  admitted record;
  ts timestamptz;
BEGIN
  -- The common call, a root run without options, in one statement: its WHERE holds every check
  -- of admit_run that can pass without an error (valid input; the environment found, usable and
  -- in a fresh mirror; its roots living in this store). On any miss nothing is written and the
  -- full path below raises the error in the SPEC's order. A fresh id conflicts with nothing, so
  -- a plain INSERT (ON CONFLICT would cost a speculative-insert WAL record per run).
  IF trigger_run.options = '{}'::jsonb THEN
    ts := now();
    INSERT INTO runs
    SELECT n.*
    FROM runtime_environments AS e
    JOIN projects AS p ON p.id = e.project_id
    JOIN organizations AS o ON o.id = e.organization_id
    CROSS JOIN split_settings AS st
    CROSS JOIN LATERAL (SELECT ROW(e.id, e.project_id, e.organization_id, e.type, e.paused, e.archived,
                                   p.deleted_at IS NOT NULL, o.runs_enabled, o.mint_kind,
                                   e.maximum_concurrency_limit, e.notifications, st.enabled, st.ever_enabled,
                                   st.default_mint_kind)::environment_context AS ctx) AS x
    CROSS JOIN LATERAL new_run(CASE WHEN local_residency() = 'NEW' THEN next_ksuid() ELSE generate_cuid() END,
                               x.ctx, NULL, trigger_run.task_identifier, trigger_run.payload, no_options(),
                               'PENDING', NULL, NULL, ts) AS n
    WHERE e.id = trigger_run.environment_id
      AND task_identifier_is_valid(trigger_run.task_identifier)
      AND (trigger_run.payload IS NULL OR payload_within_smallest_limits(trigger_run.payload))
      AND NOT e.archived AND NOT e.paused AND p.deleted_at IS NULL AND o.runs_enabled
      AND root_residency(x.ctx) = local_residency()
      AND (local_residency() = 'LEGACY'
           OR EXISTS (SELECT FROM heartbeats AS b CROSS JOIN store_config AS c
                      WHERE b.source IN ('control_plane_tick', 'mirror_pull')
                        AND mirror_within_bound(b.beat_at, c.mirror_freshness_seconds)))
    RETURNING 'run_' || runs.id, false, runs.status, local_residency()
    INTO run_id, is_cached, status, residency;
    IF FOUND THEN
      RETURN NEXT;
      RETURN;
    END IF;
  END IF;
  admitted := admit_run(trigger_run.environment_id, trigger_run.task_identifier, trigger_run.payload,
                        trigger_run.options, NULL, NULL);
  run_id := admitted.run_id;
  is_cached := admitted.is_cached;
  status := admitted.status;
  residency := admitted.residency;
  RETURN NEXT;  -- cheaper than RETURN QUERY, which runs a query into a tuplestore
END
$$;

-- A run that could not be triggered (a bad batch item, a deploy that failed): born
-- SYSTEM_FAILURE, so a batch still counts it and a waiting parent resumes with its error.
CREATE OR REPLACE FUNCTION runops.trigger_failed_task(environment_id text, task_identifier text, payload jsonb,
                                                      error jsonb, options jsonb DEFAULT '{}')
RETURNS TABLE (run_id text, is_cached boolean, status text, residency text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  admitted record := admit_run(trigger_failed_task.environment_id, trigger_failed_task.task_identifier,
                               coalesce(trigger_failed_task.payload, '{}'), trigger_failed_task.options,
                               'SYSTEM_FAILURE',
                               coalesce(trigger_failed_task.error, '{"message": "the task could not be triggered"}'));
BEGIN
  run_id := admitted.run_id;
  is_cached := admitted.is_cached;
  status := admitted.status;
  residency := admitted.residency;
  RETURN NEXT;
END
$$;
