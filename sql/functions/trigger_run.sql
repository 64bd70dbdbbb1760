-- Triggering runs (SPEC §4): trigger_run and trigger_failed_task.
--
-- trigger_run = validate_new_run (RO006, bounded_input.sql) -> load_environment (one query, with
--   the split settings) -> decide_residency (RO001, RO006, RO002) -> require_parent (RO004, RO003)
--   -> require_usable (RO004, RO005) -> find_or_create_run (idempotency.sql).
-- trigger_failed_task takes the same path (admit_new_run) to a run born SYSTEM_FAILURE.

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
-- find_or_create_run. initial_status NULL lets find_or_create_run choose PENDING or DELAYED. The
-- run's id comes back bare.
CREATE OR REPLACE FUNCTION runops.admit_new_run(environment_id text, task_identifier text, payload jsonb,
                                                options jsonb, initial_status text, error jsonb,
                                                OUT run_id text, OUT is_cached boolean, OUT status text,
                                                OUT residency text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  spec trigger_spec;
  env_id text := admit_new_run.environment_id;
  task text := admit_new_run.task_identifier;
  owner_residency text;
  env environment_context;
  parent runs;
  target batches;
  created record;
  existing text;
BEGIN
  spec := validate_new_run(env_id, task, admit_new_run.payload, admit_new_run.options);
  IF admit_new_run.error IS NOT NULL THEN
    PERFORM check_json_bounds(admit_new_run.error, 'error');
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
      SELECT r.id, true, r.status, local_residency() INTO run_id, is_cached, status, residency
      FROM runs AS r WHERE r.id = existing;
      RETURN;
    END IF;
  END IF;
  created := find_or_create_run(env, parent, task, admit_new_run.payload, spec, initial_status,
                                admit_new_run.error);
  IF spec.batch_id IS NOT NULL THEN
    PERFORM attach_batch_item(spec.batch_id, spec.batch_index, created.run_id);
  END IF;
  run_id := created.run_id;
  is_cached := created.is_cached;
  status := created.status;
  residency := created.residency;  -- a cached holder may live in the other store
END
$$;

-- The environment a root run without anchors is admitted into, when every check of admit_new_run
-- passes: a valid task identifier and a payload within the smallest limits (validate_new_run;
-- options are the caller's to check), the environment found in a fresh mirror
-- (load_environment's rule), usable (require_usable), its roots living in this store
-- (decide_residency). No row when any check fails: the caller then takes admit_new_run, which
-- names the failure. Inlined SQL, so it costs no call of its own.
CREATE OR REPLACE FUNCTION runops.root_admission(environment_id text, task_identifier text, payload jsonb)
RETURNS SETOF runops.environment_context
LANGUAGE sql STABLE
AS $$
  SELECT (x.ctx).*
  FROM runops.runtime_environments AS e
  JOIN runops.projects AS p ON p.id = e.project_id
  JOIN runops.organizations AS o ON o.id = e.organization_id
  CROSS JOIN runops.split_settings AS st
  CROSS JOIN LATERAL (SELECT ROW(e.id, e.project_id, e.organization_id, e.type, e.paused, e.archived,
                                 p.deleted_at IS NOT NULL, o.runs_enabled, o.mint_kind,
                                 e.maximum_concurrency_limit, e.notifications, st.enabled, st.ever_enabled,
                                 st.default_mint_kind)::runops.environment_context AS ctx) AS x
  WHERE e.id = root_admission.environment_id
    AND runops.task_identifier_is_valid(root_admission.task_identifier)
    AND (root_admission.payload IS NULL OR runops.payload_within_smallest_limits(root_admission.payload))
    AND NOT e.archived AND NOT e.paused AND p.deleted_at IS NULL AND o.runs_enabled
    AND runops.root_residency(x.ctx) = runops.local_residency()
    AND EXISTS (SELECT FROM runops.environment_here(e.id))  -- shards.sql
    AND (runops.local_residency() = 'LEGACY'
         OR EXISTS (SELECT FROM runops.mirror_feed() AS f WHERE runops.mirror_within_bound(f.fed_at, f.bound_seconds)))
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
  spec trigger_spec;
  env environment_context;
BEGIN
  -- The common calls, a root run without options or with only a key, skip admit_new_run's chain
  -- of checks: root_admission holds every one of them that can pass without an error, as
  -- predicates of one query. On any miss nothing was written and the full path below raises the
  -- error in the SPEC's order. Without a key the run is one statement; a fresh id conflicts with
  -- nothing, so a plain INSERT (ON CONFLICT costs a speculative-insert WAL record per run).
  IF trigger_run.options = '{}'::jsonb THEN
    ts := now();
    INSERT INTO runs
    SELECT n.*
    FROM root_admission(trigger_run.environment_id, trigger_run.task_identifier, trigger_run.payload)
           AS admitted_env
    -- The id is minted in a sub-select of its own: a volatile argument would stop PostgreSQL
    -- inlining new_run (it would run as a function call per run).
    CROSS JOIN LATERAL (SELECT CASE WHEN local_residency() = 'NEW' THEN next_ksuid() ELSE generate_cuid() END
                        AS id) AS minted
    CROSS JOIN LATERAL new_run(minted.id, admitted_env, NULL, NULL, NULL, trigger_run.task_identifier,
                               trigger_run.payload, no_options(), 'PENDING', NULL, NULL, NULL, NULL, ts) AS n
    RETURNING 'run_' || runs.id, false, runs.status, local_residency()
    INTO run_id, is_cached, status, residency;
    IF FOUND THEN
      RETURN NEXT;
      RETURN;
    END IF;
  ELSIF only_a_valid_key(trigger_run.options) THEN
    -- A root with only a key: the same checks in one query, then the idempotency engine.
    spec := no_options();
    spec.idempotency_key := trigger_run.options ->> 'idempotency_key';
    SELECT * INTO env
    FROM root_admission(trigger_run.environment_id, trigger_run.task_identifier, trigger_run.payload);
  END IF;
  IF env.id IS NOT NULL THEN  -- a root with only a key, admitted just above
    admitted := find_or_create_run(env, NULL, trigger_run.task_identifier, trigger_run.payload, spec, NULL, NULL);
  ELSE
    admitted := admit_new_run(trigger_run.environment_id, trigger_run.task_identifier, trigger_run.payload,
                              trigger_run.options, NULL, NULL);
  END IF;
  run_id := 'run_' || admitted.run_id;
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
  admitted record := admit_new_run(trigger_failed_task.environment_id, trigger_failed_task.task_identifier,
                                   coalesce(trigger_failed_task.payload, '{}'), trigger_failed_task.options,
                                   'SYSTEM_FAILURE',
                                   coalesce(trigger_failed_task.error,
                                            '{"message": "the task could not be triggered"}'));
BEGIN
  run_id := 'run_' || admitted.run_id;
  is_cached := admitted.is_cached;
  status := admitted.status;
  residency := admitted.residency;
  RETURN NEXT;
END
$$;
