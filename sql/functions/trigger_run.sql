-- Triggering runs, and idempotency.
--
-- trigger_run = validate_new_run (RO006, in errors.sql) -> load_environment (one query, with the split
--   settings) -> decide_residency (RO001, RO006, RO002) -> require_parent (RO004, RO003)
--   -> require_usable (RO004, RO005) -> create_run.
-- create_run is the one idempotency routine: single triggers, children and (later) batch items
-- and failed-task runs all go through it.

CREATE OR REPLACE FUNCTION runops.parse_trigger_options(options jsonb)
RETURNS runops.trigger_spec
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  spec trigger_spec;
  delay jsonb := o -> 'delay';
  tags jsonb := o -> 'tags';
  raw text;
  allowed constant text[] := ARRAY[
    'idempotency_key', 'idempotency_key_scope', 'idempotency_key_ttl', 'parent_run_id',
    'parent_attempt_number', 'resume_parent_on_completion', 'delay', 'ttl', 'max_duration', 'queue',
    'concurrency_key', 'tags', 'max_attempts', 'metadata', 'run_id', 'batch_id', 'batch_index',
    'dev_session_id'];
BEGIN
  -- The common case, no options at all, skips every check below.
  IF o = '{}'::jsonb THEN
    spec.idempotency_key_scope := 'run';
    spec.idempotency_key_ttl := interval '30 days';
    spec.resume_parent_on_completion := false;
    spec.tags := '{}';
    spec.max_attempts := 3;
    spec.metadata := '{}';
    RETURN spec;
  END IF;
  -- The next most common: only a key.
  IF o - 'idempotency_key' = '{}'::jsonb AND jsonb_typeof(o -> 'idempotency_key') = 'string'
     AND length(o ->> 'idempotency_key') BETWEEN 1 AND 2048
     AND octet_length(o ->> 'idempotency_key') <= max_index_text_bytes() THEN
    spec.idempotency_key := o ->> 'idempotency_key';
    spec.idempotency_key_scope := 'run';
    spec.idempotency_key_ttl := interval '30 days';
    spec.resume_parent_on_completion := false;
    spec.tags := '{}';
    spec.max_attempts := 3;
    spec.metadata := '{}';
    RETURN spec;
  END IF;
  IF (o - allowed) <> '{}'::jsonb THEN
    PERFORM reject_unknown_options(o, allowed, 'trigger');
  END IF;

  spec.idempotency_key := option_text(o, 'idempotency_key', 2048);
  IF spec.idempotency_key = '' THEN
    PERFORM raise_error('RO006', 'option idempotency_key must not be empty');
  END IF;
  spec.idempotency_key_scope := coalesce(option_text(o, 'idempotency_key_scope'), 'run');
  IF spec.idempotency_key_scope NOT IN ('run', 'attempt', 'global') THEN
    PERFORM raise_error('RO006', format('option idempotency_key_scope must be run, attempt or global, got %s',
                                         spec.idempotency_key_scope));
  END IF;
  spec.idempotency_key_ttl := CASE WHEN o ? 'idempotency_key_ttl'
                                   THEN parse_duration(option_text(o, 'idempotency_key_ttl'), 'option idempotency_key_ttl')
                                   ELSE interval '30 days' END;

  raw := option_text(o, 'parent_run_id');
  IF raw IS NOT NULL THEN
    spec.parent_run_id := bare_id(raw, 'run');
    IF spec.parent_run_id IS NULL THEN
      PERFORM raise_error('RO006', format('option parent_run_id %s is not a run id', raw));
    END IF;
  END IF;
  spec.parent_attempt_number := option_integer(o, 'parent_attempt_number', 1, 250);
  spec.resume_parent_on_completion := coalesce(option_boolean(o, 'resume_parent_on_completion'), false);
  IF spec.resume_parent_on_completion AND spec.parent_run_id IS NULL THEN
    PERFORM raise_error('RO006', 'option resume_parent_on_completion needs parent_run_id');
  END IF;

  IF delay IS NOT NULL AND delay <> 'null'::jsonb THEN
    raw := option_text(o, 'delay');
    IF raw ~ '^\d+[smhdw]$' THEN
      spec.delay_until := now() + parse_duration(raw, 'option delay');
    ELSE
      spec.delay_until := parse_timestamp(raw, 'option delay');
    END IF;
  END IF;
  IF o ? 'ttl' AND o -> 'ttl' <> 'null'::jsonb THEN
    spec.ttl := parse_duration(option_text(o, 'ttl'), 'option ttl');
  END IF;
  IF o ? 'max_duration' AND o -> 'max_duration' <> 'null'::jsonb THEN
    spec.max_duration := parse_duration(option_text(o, 'max_duration'), 'option max_duration');
  END IF;
  spec.queue := option_text(o, 'queue', 256);
  spec.concurrency_key := option_text(o, 'concurrency_key', 256);

  IF tags IS NOT NULL AND tags <> 'null'::jsonb THEN
    IF jsonb_typeof(tags) = 'string' THEN
      tags := jsonb_build_array(tags);
    END IF;
    IF jsonb_typeof(tags) <> 'array'
       OR EXISTS (SELECT FROM jsonb_array_elements(tags) AS t
                  WHERE jsonb_typeof(t) <> 'string' OR length(t #>> '{}') NOT BETWEEN 1 AND 128) THEN
      PERFORM raise_error('RO006', 'option tags must be a string or an array of strings of 1 to 128 characters');
    END IF;
    IF jsonb_array_length(tags) > 10 THEN
      PERFORM raise_error('RO006', format('option tags has %s tags; the limit is 10', jsonb_array_length(tags)));
    END IF;
    SELECT array_agg(DISTINCT t ORDER BY t) INTO spec.tags FROM jsonb_array_elements_text(tags) AS t;
  END IF;
  spec.tags := coalesce(spec.tags, '{}');

  spec.max_attempts := coalesce(option_integer(o, 'max_attempts', 1, 250), 3);
  spec.metadata := o -> 'metadata';
  IF spec.metadata IS NOT NULL AND jsonb_typeof(spec.metadata) NOT IN ('object', 'null') THEN
    PERFORM raise_error('RO006', 'option metadata must be a JSON object');
  END IF;
  spec.metadata := coalesce(nullif(spec.metadata, 'null'::jsonb), '{}');
  PERFORM check_json_bounds(spec.metadata, 'option metadata');

  raw := option_text(o, 'run_id');
  IF raw IS NOT NULL THEN
    spec.run_id := bare_id(raw, 'run');
    IF spec.run_id IS NULL THEN
      PERFORM raise_error('RO006', format('option run_id %s is not a run id', raw));
    END IF;
  END IF;
  raw := option_text(o, 'batch_id');
  IF raw IS NOT NULL THEN
    spec.batch_id := bare_id(raw, 'batch');
    IF spec.batch_id IS NULL THEN
      PERFORM raise_error('RO006', format('option batch_id %s is not a batch id', raw));
    END IF;
  END IF;
  spec.batch_index := option_integer(o, 'batch_index', 0, 2147483647);
  IF spec.batch_id IS NOT NULL AND spec.batch_index IS NULL THEN
    PERFORM raise_error('RO006', 'option batch_id needs batch_index');
  END IF;
  spec.dev_session_id := option_text(o, 'dev_session_id', 256);
  RETURN spec;
END
$$;

-- The dedup key, exactly as the SPEC writes it: sha256 of key and salt joined by '-'. With no
-- parent every scope acts as global. STABLE, like convert_to inside it: an IMMUTABLE label over
-- a STABLE body stops PostgreSQL inlining it, and then it is planned again in every transaction.
CREATE OR REPLACE FUNCTION runops.idempotency_key_hash(key text, scope text, parent_run_id text,
                                                       parent_attempt_number integer)
RETURNS text
LANGUAGE sql STABLE
AS $$
  SELECT encode(sha256(convert_to(array_to_string(
           ARRAY[key] || CASE
                           WHEN parent_run_id IS NULL OR scope = 'global' THEN ARRAY[]::text[]
                           WHEN scope = 'attempt' THEN ARRAY['run_' || parent_run_id, parent_attempt_number::text]
                           ELSE ARRAY['run_' || parent_run_id]
                         END, '-'), 'UTF8')), 'hex')
$$;

-- A held key is dead — ignored by dedup — once it expired (at the caller's runops.now(), passed
-- in so a set-based caller reads the clock once) or its run ended in a status that releases it
-- (runops.run_statuses.releases_key).
CREATE OR REPLACE FUNCTION runops.idempotency_key_is_dead(status text, expires_at timestamptz, at timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT expires_at <= at OR runops.status_releases_key(status)
$$;

-- Creates one run in this store, or returns the run that already holds its key (or its
-- pre-minted id). The caller has validated everything, decided this store owns the run, and
-- looked up the parent (require_parent; a NULL row for a root).
--
-- Why a loop: in READ COMMITTED a conflicting row committed after our SELECT's snapshot makes
-- INSERT ... ON CONFLICT DO NOTHING return nothing, and only a *new* statement sees the
-- winner. Reading first keeps the cached path free of id minting and of any write.
CREATE OR REPLACE FUNCTION runops.create_run(
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
        IF existing.environment_id <> env.id OR existing.task_identifier <> create_run.task_identifier THEN
          PERFORM raise_error('RO006', format('pre-minted run id run_%s already names a run of another environment or task',
                                               spec.run_id));
        END IF;
        run_id := 'run_' || existing.id; is_cached := true; status := existing.status;
        PERFORM wait_for_child(spec, parent, existing.id, existing.status);
        RETURN;
      END IF;
    END IF;

    IF key_hash IS NOT NULL THEN
      SELECT r.id, r.status, r.idempotency_key_expires_at AS expires_at INTO existing
      FROM runs AS r
      WHERE r.environment_id = env.id AND r.task_identifier = create_run.task_identifier
        AND r.idempotency_key_hash = key_hash;
      IF FOUND THEN
        IF NOT idempotency_key_is_dead(existing.status, existing.expires_at, ts) THEN
          run_id := 'run_' || existing.id; is_cached := true; status := existing.status;
          -- Trigger-and-wait on a cached run waits on that run (at once done if it finished).
          PERFORM wait_for_child(spec, parent, existing.id, existing.status);
          RETURN;
        END IF;
        -- Dead key: release it so the new run can hold it.
        PERFORM release_dead_key(existing.id, key_hash);
      END IF;
    END IF;

    new_id := coalesce(spec.run_id, mint_id());
    -- Across the seam (SPEC §6): once the split was ever enabled, a new key holder first claims
    -- the key in the ledger, which may name a live holder in either store.
    IF key_hash IS NOT NULL THEN
      IF must_claim IS NULL AND local_residency() = 'LEGACY' THEN
        -- Decided under the gate lock, against the settings as they are now.
        PERFORM lock_key_claim(env.id, create_run.task_identifier, key_hash);
        must_claim := claims_required();
        IF must_claim THEN
          CONTINUE;  -- read the local holder again, now that same-key claimants queue behind us
        END IF;
      END IF;
      must_claim := coalesce(must_claim, env.split_ever_enabled);  -- run-ops: the ledger is local
      IF must_claim THEN
        claim := claim_idempotency_key(env.id, create_run.task_identifier, key_hash, ts + spec.idempotency_key_ttl,
                                       new_id);
        IF claim.holder_id IS NOT NULL THEN
          run_id := 'run_' || claim.holder_id; is_cached := true; status := claim.holder_status;
          residency := classify_bare(claim.holder_id);
          PERFORM wait_for_child(spec, parent, claim.holder_id, claim.holder_status);
          RETURN;
        END IF;
      END IF;
    END IF;
    INSERT INTO runs AS r (
      id, environment_id, project_id, organization_id, task_identifier, status, payload, error,
      metadata, tags, queue, concurrency_key, idempotency_key, idempotency_key_hash, idempotency_key_scope,
      idempotency_key_expires_at, parent_run_id, parent_attempt_number, root_run_id, depth,
      resume_parent_on_completion, batch_id, batch_index, max_attempts, delay_until, ttl, max_duration,
      dev_session_id, queued_at, ttl_expires_at, completed_at, created_at, updated_at)
    VALUES (
      new_id, env.id, env.project_id, env.organization_id, create_run.task_identifier, run_status,
      coalesce(create_run.payload, '{}'), create_run.error, spec.metadata, spec.tags,
      coalesce(spec.queue, 'task/' || create_run.task_identifier), spec.concurrency_key,
      CASE WHEN key_hash IS NOT NULL THEN spec.idempotency_key END, key_hash,
      CASE WHEN key_hash IS NOT NULL THEN
        CASE WHEN spec.parent_run_id IS NULL THEN 'global' ELSE spec.idempotency_key_scope END END,
      CASE WHEN key_hash IS NOT NULL THEN ts + spec.idempotency_key_ttl END,
      spec.parent_run_id, spec.parent_attempt_number, coalesce(parent.root_run_id, parent.id),
      coalesce(parent.depth + 1, 0), spec.resume_parent_on_completion, spec.batch_id, spec.batch_index,
      spec.max_attempts, CASE WHEN run_status = 'DELAYED' THEN spec.delay_until END, spec.ttl,
      spec.max_duration, spec.dev_session_id, CASE WHEN run_status = 'PENDING' THEN ts END,
      CASE WHEN run_status = 'PENDING' THEN ts + spec.ttl END,
      CASE WHEN run_status = 'SYSTEM_FAILURE' THEN ts END, ts, ts)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
      run_id := 'run_' || new_id; is_cached := false; status := run_status;
      IF spec.resume_parent_on_completion THEN
        PERFORM wait_for_child(spec, parent, new_id, run_status);
      END IF;
      RETURN;
    END IF;
    -- Lost a race on the key or on the pre-minted id: the next pass reads the winner.
  END LOOP;
END
$$;

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

CREATE OR REPLACE FUNCTION runops.trigger_run(environment_id text, task_identifier text,
                                              payload jsonb DEFAULT '{}', options jsonb DEFAULT '{}')
RETURNS TABLE (run_id text, is_cached boolean, status text, residency text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  spec trigger_spec;
  env_id text := trigger_run.environment_id;
  task text := trigger_run.task_identifier;
  owner_residency text;
  env environment_context;
  parent runs;
  target batches;
  created record;
  existing text;
BEGIN
  spec := validate_new_run(env_id, task, trigger_run.payload, trigger_run.options);
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
  env := require_usable(env, env_id);
  PERFORM require_waitable_parent(parent, spec.resume_parent_on_completion);
  IF spec.batch_id IS NOT NULL THEN
    existing := claim_batch_index(target, spec);
    IF existing IS NOT NULL THEN
      SELECT 'run_' || r.id, true, r.status, local_residency() INTO run_id, is_cached, status, residency
      FROM runs AS r WHERE r.id = existing;
      RETURN NEXT;
      RETURN;
    END IF;
  END IF;
  created := create_run(env, parent, task, trigger_run.payload, spec, NULL, NULL);
  IF spec.batch_id IS NOT NULL THEN
    PERFORM attach_batch_item(spec.batch_id, spec.batch_index, substr(created.run_id, 5));
  END IF;
  run_id := created.run_id;
  is_cached := created.is_cached;
  status := created.status;
  residency := created.residency;  -- a cached holder may live in the other store
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
  spec trigger_spec;
  env_id text := trigger_failed_task.environment_id;
  task text := trigger_failed_task.task_identifier;
  owner_residency text;
  env environment_context;
  parent runs;
  target batches;
  created record;
  existing text;
BEGIN
  spec := validate_new_run(env_id, task, trigger_failed_task.payload, trigger_failed_task.options);
  PERFORM check_json_bounds(trigger_failed_task.error, 'error');
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
      RETURN QUERY SELECT 'run_' || r.id, true, r.status, local_residency() FROM runs AS r WHERE r.id = existing;
      RETURN;
    END IF;
  END IF;
  created := create_run(env, parent, task, coalesce(trigger_failed_task.payload, '{}'), spec, 'SYSTEM_FAILURE',
                        coalesce(trigger_failed_task.error, '{"message": "the task could not be triggered"}'));
  IF spec.batch_id IS NOT NULL THEN
    PERFORM attach_batch_item(spec.batch_id, spec.batch_index, substr(created.run_id, 5));
  END IF;
  RETURN QUERY SELECT created.run_id, created.is_cached, created.status, created.residency;
END
$$;

CREATE OR REPLACE FUNCTION runops.reset_idempotency_key(
  environment_id text, task_identifier text, idempotency_key text, scope text DEFAULT 'run',
  parent_run_id text DEFAULT NULL, parent_attempt_number integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  parent text;
  cleared integer;
BEGIN
  IF reset_idempotency_key.idempotency_key IS NULL OR reset_idempotency_key.idempotency_key = ''
     OR length(reset_idempotency_key.idempotency_key) > 2048 THEN
    PERFORM raise_error('RO006', 'idempotency_key must be 1 to 2048 characters');
  END IF;
  IF coalesce(scope, 'run') NOT IN ('run', 'attempt', 'global') THEN
    PERFORM raise_error('RO006', format('scope must be run, attempt or global, got %s', scope));
  END IF;
  IF reset_idempotency_key.parent_run_id IS NOT NULL THEN
    parent := require_id(reset_idempotency_key.parent_run_id, 'run', 'parent_run_id');
    IF scope = 'attempt' AND reset_idempotency_key.parent_attempt_number IS NULL THEN
      PERFORM raise_error('RO006', 'an attempt-scoped key needs parent_attempt_number');
    END IF;
  END IF;
  UPDATE runs AS r
  SET idempotency_key = NULL, idempotency_key_hash = NULL, idempotency_key_expires_at = NULL, updated_at = now()
  WHERE r.environment_id = reset_idempotency_key.environment_id
    AND r.task_identifier = reset_idempotency_key.task_identifier
    AND r.idempotency_key_hash = idempotency_key_hash(reset_idempotency_key.idempotency_key, coalesce(scope, 'run'),
                                                      parent, reset_idempotency_key.parent_attempt_number);
  GET DIAGNOSTICS cleared = ROW_COUNT;
  RETURN cleared;
END
$$;
