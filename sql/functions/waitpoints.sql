-- Waitpoints: what a run can wait on, and the edges that say it does.
--
-- Edges (run_waitpoints) live with the blocked run; the waitpoint may live in either store.
-- A local completion completes local edges and resumes their runs in the same transaction;
-- edges in the other store are reported back (remote_run_ids) so the client can send resume_run
-- there, and tick there re-checks any it missed by reading this store through the FDW.
-- block_run and complete_waitpoint take the optional environment guard (RO004 for another
-- environment's row); a completion's output passes check_json_bounds.

-- The waitpoint named by a bare id, from the store its shape names. 0 rows when it does not
-- exist (or lives in a store that is not wired). RO009 when that store is unreachable.
CREATE OR REPLACE FUNCTION runops.find_waitpoint(waitpoint_id text)
RETURNS SETOF runops.waitpoint_view
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  residency text := read_residency(waitpoint_id);
BEGIN
  IF residency = local_residency() THEN
    RETURN QUERY SELECT * FROM waitpoint_view AS w WHERE w.id = find_waitpoint.waitpoint_id;
    RETURN;
  ELSIF residency IS NULL THEN
    RETURN;
  END IF;
  BEGIN
    RETURN QUERY SELECT * FROM runops_peer.waitpoint_view AS w WHERE w.id = find_waitpoint.waitpoint_id;
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', format('the %s store that owns waitpoint_%s is unavailable: %s',
                                        store_for_residency(residency), waitpoint_id, SQLERRM));
  END;
END
$$;

-- Whether a waitpoint row counts as done at time ts (a DATETIME waitpoint is done once due,
-- even before tick has marked it).
CREATE OR REPLACE FUNCTION runops.waitpoint_done(status text, type text, completed_after timestamptz, ts timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT status = 'COMPLETED' OR (type = 'DATETIME' AND completed_after <= ts)
$$;

-- Completes the pending local edges on a waitpoint and resumes the runs it was the last
-- blocker of. Returns the (bare) ids of the runs nothing blocks any more.
CREATE OR REPLACE FUNCTION runops.resume_local_waiters(waitpoint_id text)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  blocked text;
  unblocked text[] := '{}'::text[];
BEGIN
  -- Lock the blocked runs in id order, so two completions never deadlock on each other.
  FOR blocked IN
    SELECT e.run_id FROM run_waitpoints AS e
    WHERE e.waitpoint_id = resume_local_waiters.waitpoint_id AND e.completed_at IS NULL
    ORDER BY e.run_id
  LOOP
    UPDATE run_waitpoints AS e SET completed_at = now()
    WHERE e.run_id = blocked AND e.waitpoint_id = resume_local_waiters.waitpoint_id AND e.completed_at IS NULL;
    IF resume_if_unblocked(blocked, false) THEN
      unblocked := unblocked || blocked;
    END IF;
  END LOOP;
  RETURN unblocked;
END
$$;

-- Marks the run's pending edges whose waitpoints are done: local ones always, the other
-- store's through the FDW when include_remote. Returns how many edges it completed.
CREATE OR REPLACE FUNCTION runops.refresh_blockers(run_id text, include_remote boolean)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
  k integer;
  remote text[];
  done text[];
BEGIN
  UPDATE run_waitpoints AS e SET completed_at = ts
  FROM waitpoint_view AS w
  WHERE e.run_id = refresh_blockers.run_id AND e.completed_at IS NULL AND w.id = e.waitpoint_id
    AND waitpoint_done(w.status, w.type, w.completed_after, ts);
  GET DIAGNOSTICS n = ROW_COUNT;
  IF NOT include_remote OR NOT peer_wired() THEN
    RETURN n;
  END IF;
  SELECT array_agg(e.waitpoint_id) INTO remote FROM run_waitpoints AS e
  WHERE e.run_id = refresh_blockers.run_id AND e.completed_at IS NULL
    AND try_classify_residency(e.waitpoint_id) <> local_residency();
  IF remote IS NULL THEN
    RETURN n;
  END IF;
  BEGIN
    -- = ANY and plain column predicates are shipped; the time comparison happens here.
    SELECT array_agg(w.id) INTO done FROM runops_peer.waitpoint_view AS w
    WHERE w.id = ANY (remote) AND waitpoint_done(w.status, w.type, w.completed_after, ts);
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', 'the other store is unavailable, so the run''s waitpoints there cannot be checked: '
                                 || SQLERRM);
  END;
  UPDATE run_waitpoints AS e SET completed_at = ts
  WHERE e.run_id = refresh_blockers.run_id AND e.completed_at IS NULL AND e.waitpoint_id = ANY (done);
  GET DIAGNOSTICS k = ROW_COUNT;
  RETURN n + k;
END
$$;

-- Adds an edge "run waits on waitpoint", born completed when the waitpoint already is.
CREATE OR REPLACE FUNCTION runops.add_blocker(run_id text, environment_id text, waitpoint_id text, done boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  INSERT INTO run_waitpoints AS e (run_id, waitpoint_id, environment_id, completed_at, created_at)
  VALUES (add_blocker.run_id, add_blocker.waitpoint_id, add_blocker.environment_id,
          CASE WHEN done THEN now() END, now())
  ON CONFLICT ON CONSTRAINT run_waitpoints_pkey DO NOTHING;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_waitpoint(environment_id text, type text, options jsonb DEFAULT '{}')
RETURNS TABLE (waitpoint_id text, is_cached boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  env_id text := create_waitpoint.environment_id;
  kind text := create_waitpoint.type;
  key text;
  key_ttl interval;
  due timestamptz;
  timeout interval;
  tags text[];
  env environment_context;
  residency text;
  existing record;
  new_id text;
  ts timestamptz := now();
BEGIN
  IF kind IS NULL OR kind NOT IN ('DATETIME', 'MANUAL') THEN
    PERFORM raise_invalid('waitpoint type', 'DATETIME or MANUAL', quote_nullable(input_prefix(kind)),
                          'RUN and BATCH waitpoints come with their run or batch');
  END IF;
  PERFORM reject_unknown_options(o, ARRAY['idempotency_key', 'idempotency_key_ttl', 'completed_after', 'timeout',
                                          'tags'], 'waitpoint');
  key := option_idempotency_key(o);
  key_ttl := option_duration(o, 'idempotency_key_ttl', default_idempotency_key_ttl());
  IF kind = 'DATETIME' THEN
    due := option_moment(o, 'completed_after', ts);
    IF due IS NULL THEN
      PERFORM raise_error('RO006', 'a DATETIME waitpoint needs completed_after (a duration or a timestamp)');
    END IF;
  ELSIF option_text(o, 'completed_after') IS NOT NULL THEN
    PERFORM raise_error('RO006', 'completed_after is for DATETIME waitpoints; a MANUAL one takes timeout');
  END IF;
  IF kind <> 'MANUAL' AND option_value(o, 'timeout') IS NOT NULL THEN
    PERFORM raise_error('RO006', 'timeout is for MANUAL waitpoints');
  END IF;
  timeout := option_duration(o, 'timeout', NULL);
  tags := coalesce(option_text_array(o, 'tags'), '{}');
  IF cardinality(tags) > 10 THEN
    PERFORM raise_error('RO006', format('option tags has %s tags; the limit is 10', cardinality(tags)));
  END IF;
  IF EXISTS (SELECT FROM unnest(tags) AS t WHERE length(t) NOT BETWEEN 1 AND 128) THEN
    PERFORM raise_error('RO006', 'option tags must hold strings of 1 to 128 characters');
  END IF;
  env := load_environment(env_id);
  IF env.id IS NOT NULL THEN
    residency := root_residency(env);
    IF residency <> local_residency() THEN
      PERFORM raise_wrong_store('a new waitpoint of environment', env_id, store_for_residency(residency));
    END IF;
  END IF;
  env := require_usable(env, env_id);

  LOOP
    IF key IS NOT NULL THEN
      SELECT w.id, w.idempotency_key_expires_at AS expires_at INTO existing FROM waitpoints AS w
      WHERE w.environment_id = env.id AND w.idempotency_key = key;
      IF FOUND THEN
        IF NOT idempotency_key_expired(existing.expires_at, ts) THEN
          RETURN QUERY SELECT 'waitpoint_' || existing.id, true;
          RETURN;
        END IF;
        -- An expired key rotates: the old waitpoint lets go of it (waitpoint keys die only by
        -- expiry: docs/decisions.md).
        UPDATE waitpoints AS w SET idempotency_key = NULL, idempotency_key_expires_at = NULL
        WHERE w.id = existing.id AND w.idempotency_key = key;
      END IF;
    END IF;
    new_id := mint_id();
    INSERT INTO waitpoints (id, environment_id, type, status, completed_after, timeout_at, idempotency_key,
                            idempotency_key_expires_at, tags, created_at)
    VALUES (new_id, env.id, kind, 'PENDING', due, ts + timeout, key, CASE WHEN key IS NOT NULL THEN ts + key_ttl END,
            tags, ts)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
      RETURN QUERY SELECT 'waitpoint_' || new_id, false;
      RETURN;
    END IF;
  END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION runops.block_run(run_id text, waitpoint_ids text[], options jsonb DEFAULT '{}',
                                            environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  bare_ids text[] := '{}'::text[];
  found_waitpoints waitpoint_view[] := '{}'::waitpoint_view[];
  raw text;
  run_bare text;
  r runs;
  w waitpoint_view;
  ts timestamptz := now();
BEGIN
  PERFORM reject_unknown_options(o, ARRAY[]::text[], 'block_run');
  IF waitpoint_ids IS NULL OR cardinality(waitpoint_ids) NOT BETWEEN 1 AND 100 THEN
    PERFORM raise_error('RO006', 'waitpoint_ids must name 1 to 100 waitpoints');
  END IF;
  run_bare := bare_id(block_run.run_id, 'run');
  FOREACH raw IN ARRAY waitpoint_ids LOOP
    raw := bare_id(raw, 'waitpoint');
    IF raw IS NOT NULL AND raw = run_bare THEN
      PERFORM raise_error('RO006', format('run_%s cannot wait on its own waitpoint', run_bare));
    END IF;
  END LOOP;
  FOREACH raw IN ARRAY waitpoint_ids LOOP
    bare_ids := bare_ids || require_id(raw, 'waitpoint', 'waitpoint id');
  END LOOP;
  r := lock_run(block_run.run_id, block_run.environment_id);
  FOREACH raw IN ARRAY bare_ids LOOP
    SELECT * INTO w FROM find_waitpoint(raw);
    IF w.id IS NULL OR w.environment_id <> r.environment_id THEN
      PERFORM raise_error('RO004', format('waitpoint_%s not found in environment %s', raw, r.environment_id));
    END IF;
    found_waitpoints := found_waitpoints || w;
  END LOOP;
  IF is_final_status(r.status) THEN
    PERFORM raise_error('RO003', format('run_%s is %s: a final run waits for nothing', r.id, r.status));
  END IF;
  FOREACH w IN ARRAY found_waitpoints LOOP
    -- An edge on a waitpoint that is already done is born done: blocking never hangs.
    PERFORM add_blocker(r.id, r.environment_id, w.id, waitpoint_done(w.status, w.type, w.completed_after, ts));
  END LOOP;
  IF r.status = 'WAITING_TO_RESUME' THEN
    PERFORM resume_if_unblocked(r.id, false);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.complete_waitpoint(waitpoint_id text, output jsonb DEFAULT NULL,
                                                     is_error boolean DEFAULT false, environment_id text DEFAULT NULL)
RETURNS TABLE (completed_now boolean, unblocked_run_ids text[], remote_run_ids text[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text;
  w waitpoints;
  unblocked text[] := '{}'::text[];
  remote text[] := '{}'::text[];
  now_done boolean := false;
  env_id text := complete_waitpoint.environment_id;
BEGIN
  PERFORM check_json_bounds(complete_waitpoint.output, 'output');
  bare := require_local_id(complete_waitpoint.waitpoint_id, 'waitpoint', 'waitpoint_id');
  SELECT * INTO w FROM waitpoints AS x WHERE x.id = bare FOR UPDATE;
  IF FOUND THEN
    PERFORM require_row_environment(w.environment_id, env_id, 'waitpoint', complete_waitpoint.waitpoint_id);
  ELSE
    -- Another environment's run or batch is "not found" (RO004 comes before RO003).
    IF EXISTS (SELECT FROM runs AS x WHERE x.id = bare AND (env_id IS NULL OR x.environment_id = env_id)) THEN
      PERFORM raise_error('RO003', format('%s is a RUN waitpoint: it completes when its run does',
                                          complete_waitpoint.waitpoint_id));
    END IF;
    IF EXISTS (SELECT FROM batches AS x WHERE x.id = bare AND (env_id IS NULL OR x.environment_id = env_id)) THEN
      PERFORM raise_error('RO003', format('%s is a BATCH waitpoint: it completes when its batch does',
                                          complete_waitpoint.waitpoint_id));
    END IF;
    PERFORM raise_error('RO004', format('waitpoint %s not found', complete_waitpoint.waitpoint_id));
  END IF;
  -- Idempotent: a second call completes nothing and unblocks nobody.
  IF w.status = 'PENDING' THEN
    UPDATE waitpoints AS x
    SET status = 'COMPLETED', output = complete_waitpoint.output,
        output_is_error = coalesce(complete_waitpoint.is_error, false), completed_at = now()
    WHERE x.id = bare;
    now_done := true;
    unblocked := resume_local_waiters(bare);
  END IF;
  IF peer_wired() THEN
    BEGIN
      SELECT coalesce(array_agg(e.run_id ORDER BY e.run_id), '{}'::text[]) INTO remote
      FROM runops_peer.run_waitpoints AS e WHERE e.waitpoint_id = bare AND e.completed_at IS NULL;
    EXCEPTION WHEN connection_exception THEN
      remote := '{}'::text[];  -- tick in the other store finds them when it is back
    END;
  END IF;
  RETURN QUERY SELECT now_done, friendly_ids(unblocked, 'run'), friendly_ids(remote, 'run');
END
$$;

CREATE OR REPLACE FUNCTION runops.get_waitpoint(waitpoint_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.waitpoint_row
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := bare_id(get_waitpoint.waitpoint_id, 'waitpoint');
BEGIN
  RETURN QUERY
  SELECT w.waitpoint_id, w.environment_id, w.type,
         -- a due DATETIME waitpoint reads as completed even before tick marks it
         CASE WHEN waitpoint_done(w.status, w.type, w.completed_after, now()) THEN 'COMPLETED' ELSE w.status END,
         w.output, w.output_is_error, coalesce(w.completed_at, CASE WHEN w.status = 'PENDING'
                                                               AND waitpoint_done(w.status, w.type, w.completed_after, now())
                                                               THEN w.completed_after END),
         w.completed_after, w.idempotency_key
  FROM find_waitpoint(bare) AS w
  WHERE get_waitpoint.environment_id IS NULL OR w.environment_id = get_waitpoint.environment_id;
END
$$;
