-- Triggering runs (SPEC §4): trigger_run and trigger_failed_task.
--
-- trigger_run = validate_new_run (RO006, options.sql) -> admit_anchored (load_environment,
--   decide_residency: RO001, RO006, RO002; require_parent: RO004; the batch index's batch;
--   require_usable: RO004, RO005; a waiting parent: RO003) -> find_or_create_run (cached, dead, or
--   create). Batches take the same admit_anchored (claim_batch, batches.sql).
-- trigger_failed_task takes the same path (admit_new_run) to a run born SYSTEM_FAILURE.
-- The common calls (a root without options, or with only a key) take a fast path that holds the
-- same rules as inlined predicates (root_admission).

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
                                        input_prefix(require_parent.environment_id)));
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

-- Creates one run in this store, or returns the run that already holds its key (or its
-- pre-minted id): its bare id (the public functions add the prefix). The caller has validated
-- everything, decided this store owns the run, and looked up the parent (require_parent; a NULL
-- row for a root).
--
-- Why a loop: in READ COMMITTED a conflicting row committed after our SELECT's snapshot makes
-- INSERT ... ON CONFLICT DO NOTHING return nothing, and only a *new* statement sees the
-- winner. Reading first keeps the cached path free of id minting and of any write.
CREATE OR REPLACE FUNCTION runops.find_or_create_run(
  env runops.environment_context, parent runops.runs, task_identifier text, payload jsonb,
  spec runops.trigger_spec, initial_status text, error jsonb,
  OUT run_id text, OUT is_cached boolean, OUT status text, OUT residency text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  key_hash text;
  existing record;
  new_id text;
  run_status text := initial_status;
  attempts integer := 0;
  must_claim boolean;
  claim record;
BEGIN
  residency := local_residency();
  IF spec.idempotency_key IS NOT NULL THEN
    key_hash := idempotency_key_hash(spec.idempotency_key, spec.idempotency_key_scope, spec.parent_run_id,
                                     coalesce(spec.parent_attempt_number, parent.attempt_number));
  END IF;
  IF run_status IS NULL THEN
    run_status := CASE WHEN spec.delay_until > ts THEN 'DELAYED' ELSE 'PENDING' END;
  END IF;

  LOOP
    attempts := attempts + 1;
    IF attempts > 8 THEN
      -- Only reachable when rows keep appearing and vanishing under us (purges racing triggers).
      PERFORM raise_error('RO008', 'trigger kept conflicting with concurrent writes; retry the same call');
    END IF;

    IF spec.run_id IS NOT NULL THEN
      SELECT r.id, r.environment_id, r.task_identifier, r.status INTO existing
      FROM runs AS r WHERE r.id = spec.run_id;
      IF FOUND THEN
        IF existing.environment_id <> env.id
           OR existing.task_identifier <> find_or_create_run.task_identifier THEN
          PERFORM raise_error('RO006', format('pre-minted run id run_%s already names a run of another environment or task',
                                               spec.run_id));
        END IF;
        run_id := existing.id; is_cached := true; status := existing.status;
        PERFORM wait_for_child(spec, parent, existing.id, existing.status);
        RETURN;
      END IF;
    END IF;

    IF key_hash IS NOT NULL THEN
      SELECT r.id, r.status, r.idempotency_key_expires_at AS expires_at INTO existing
      FROM runs AS r
      WHERE r.environment_id = env.id AND r.task_identifier = find_or_create_run.task_identifier
        AND r.idempotency_key_hash = key_hash;
      IF FOUND THEN
        IF NOT idempotency_key_is_dead(existing.status, existing.expires_at, ts) THEN
          run_id := existing.id; is_cached := true; status := existing.status;
          -- Trigger-and-wait on a cached run waits on that run (at once done if it finished).
          PERFORM wait_for_child(spec, parent, existing.id, existing.status);
          RETURN;
        END IF;
        -- Dead key: release it so the new run can hold it.
        PERFORM release_idempotency_keys(ARRAY[existing.id], ARRAY[key_hash]);
      END IF;
    END IF;

    new_id := coalesce(spec.run_id, mint_id());
    -- Across the seam (SPEC §6): once the split was ever enabled, a new key holder first claims
    -- the key in the ledger, which may name a live holder in either store.
    IF key_hash IS NOT NULL THEN
      IF must_claim IS NULL AND local_residency() = 'LEGACY' THEN
        -- Decided under the gate lock, against the settings as they are now.
        PERFORM lock_key_claim(env.id, find_or_create_run.task_identifier, key_hash);
        must_claim := claims_required();
        IF must_claim THEN
          CONTINUE;  -- read the local holder again, now that same-key claimants queue behind us
        END IF;
      END IF;
      must_claim := coalesce(must_claim, env.split_ever_enabled);  -- run-ops: the ledger is local
      IF must_claim THEN
        claim := claim_idempotency_key(env.id, find_or_create_run.task_identifier, key_hash,
                                       ts + spec.idempotency_key_ttl, new_id);
        IF claim.holder_id IS NOT NULL THEN
          run_id := claim.holder_id; is_cached := true; status := claim.holder_status;
          residency := classify_bare(claim.holder_id);
          PERFORM wait_for_child(spec, parent, claim.holder_id, claim.holder_status);
          RETURN;
        END IF;
      END IF;
    END IF;
    IF key_hash IS NULL AND spec.run_id IS NULL THEN
      -- A fresh id conflicts with nothing: a plain INSERT (no speculative-insert WAL record).
      INSERT INTO runs
      SELECT * FROM new_run(new_id, env, parent, spec.batch_id, spec.batch_index, find_or_create_run.task_identifier,
                            find_or_create_run.payload, spec, run_status, find_or_create_run.error, NULL, NULL, NULL,
                            ts);
    ELSE
      INSERT INTO runs
      SELECT * FROM new_run(new_id, env, parent, spec.batch_id, spec.batch_index, find_or_create_run.task_identifier,
                            find_or_create_run.payload, spec, run_status, find_or_create_run.error,
                            spec.idempotency_key, key_hash, ts + spec.idempotency_key_ttl, ts)
      ON CONFLICT DO NOTHING;
    END IF;
    IF FOUND THEN
      run_id := new_id; is_cached := false; status := run_status;
      IF spec.resume_parent_on_completion THEN
        PERFORM wait_for_child(spec, parent, new_id, run_status);
      END IF;
      RETURN;
    END IF;
    -- Lost a race on the key or on the pre-minted id: the next pass reads the winner.
  END LOOP;
END
$$;

-- What every admission of new work checks once its input is valid, in the SPEC's order, for a
-- single run (admit_new_run) and a batch (claim_batch): the environment (load_environment), the
-- store its new work belongs on (decide_residency: RO001, RO006; RO002 naming the owner), the
-- parent it names (RO004), the batch whose index a single run fills (RO004, RO006), the
-- environment taking new work (RO004, RO005), and a parent that is to wait being live (RO003).
-- what names the new work in RO002 ('a new run', 'a new batch').
CREATE OR REPLACE FUNCTION runops.admit_anchored(environment_id text, spec runops.trigger_spec, what text,
                                                 OUT env runops.environment_context, OUT parent runops.runs,
                                                 OUT target runops.batches)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  owner_residency text;
BEGIN
  env := load_environment(admit_anchored.environment_id);
  owner_residency := decide_residency(env, admit_anchored.environment_id, spec);
  IF owner_residency <> local_residency() THEN
    PERFORM raise_wrong_store(what || ' of environment', admit_anchored.environment_id,
                              store_for_residency(owner_residency));
  END IF;
  IF spec.parent_run_id IS NOT NULL THEN
    parent := require_parent(spec, admit_anchored.environment_id);
  END IF;
  IF spec.batch_id IS NOT NULL THEN
    target := lock_batch_for_index(spec, admit_anchored.environment_id);
  END IF;
  -- Admitted like any other work (SPEC §3 [1.2]): an environment that takes no new work is RO005.
  env := require_usable(env, admit_anchored.environment_id);
  PERFORM require_waitable_parent(parent, spec.resume_parent_on_completion);
END
$$;

-- The one admission of a single run, for trigger_run and trigger_failed_task: every check in
-- the SPEC's order (validate_new_run, admit_anchored), then the batch index it fills (a re-sent
-- index returns its run), then find_or_create_run. initial_status NULL lets find_or_create_run choose PENDING or DELAYED. The
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
  anchored record;
  created record;
  existing text;
BEGIN
  spec := validate_new_run(env_id, task, admit_new_run.payload, admit_new_run.options);
  IF admit_new_run.error IS NOT NULL THEN
    PERFORM check_json_bounds(admit_new_run.error, 'error');
  END IF;
  anchored := admit_anchored(env_id, spec, 'a new run');
  IF spec.batch_id IS NOT NULL THEN
    existing := claim_batch_index(anchored.target, spec);
    IF existing IS NOT NULL THEN
      SELECT r.id, true, r.status, local_residency() INTO run_id, is_cached, status, residency
      FROM runs AS r WHERE r.id = existing;
      RETURN;
    END IF;
  END IF;
  created := find_or_create_run(anchored.env, anchored.parent, task, admit_new_run.payload, spec, initial_status,
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
-- (load_environment's rule), taking new work (environment_takes_new_work, require_usable's
-- rule), its roots living in this store (decide_residency). Each rule is the same inlined
-- predicate the raising path asks, and the context is built by the one builder
-- (environment_context_of), so a rule added there holds here too. No row when any check fails:
-- the caller then takes admit_new_run, which names the failure. Inlined SQL, so it costs no call
-- of its own.
CREATE OR REPLACE FUNCTION runops.root_admission(environment_id text, task_identifier text, payload jsonb)
RETURNS SETOF runops.environment_context
LANGUAGE sql STABLE
AS $$
  SELECT (x.ctx).*
  FROM runops.runtime_environments AS e
  JOIN runops.projects AS p ON p.id = e.project_id
  JOIN runops.organizations AS o ON o.id = e.organization_id
  CROSS JOIN runops.split_settings AS st
  CROSS JOIN LATERAL (SELECT runops.environment_context_of(e, p, o, st) AS ctx) AS x
  WHERE e.id = root_admission.environment_id
    AND runops.task_identifier_is_valid(root_admission.task_identifier)
    AND (root_admission.payload IS NULL OR runops.payload_within_smallest_limits(root_admission.payload))
    AND runops.environment_takes_new_work(x.ctx)
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
    CROSS JOIN LATERAL (SELECT mint_id() AS id) AS minted
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
