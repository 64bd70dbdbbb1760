-- Bulk actions (SPEC §9 [1.3]): cancel or replay every run matching a list_runs filter, across
-- both stores (tables: sql/schema/50_bulk_actions.sql; docs/operations-bulk-and-alerts.md).
--
--   create_bulk_action    on the control plane (the action's home; RO002 on run-ops): validates,
--                         then fixes the matched set — this store's matching runs and, through the
--                         FDW, the other store's — created no later than the action
--   get_bulk_action       either store: the action (the control plane's row, locally or through
--                         the FDW) with both stores' progress
--   abort_bulk_action     on the control plane: no further chunk starts; what was done stays
--   advance_bulk_actions  each store: one chunk of each open action's part this store acts on
--                         (tick calls it; the worker process calls it while there is work)
--
-- Who acts on which runs: a CANCEL's runs are cancelled by the store that holds them (a write
-- never crosses stores); a REPLAY's are replayed by the store the environment mints new runs on
-- (replay_run refuses elsewhere), reading originals from either store. A part — the members of
-- one residency — is walked in run id order by one progress row on the acting store: the keyset
-- cursor and the counts move in the same transaction as the chunk's cancels or replays, so a
-- chunk is all done or not at all, a crashed processor's chunk is simply done again, and a second
-- processor skips the part (a transaction-scoped advisory lock, then FOR UPDATE SKIP LOCKED)
-- instead of waiting for it. Replays carry the idempotency key bulk_<action>:<run>, so even a
-- part walked again after a mint-kind flip (by the new minting store) makes no second replay.

-- The one reading of a bulk action's id: bare, or NULL for another kind's prefix or an id that is
-- no bulk action's shape (a cuid: actions live on the control plane).
CREATE OR REPLACE FUNCTION runops.bulk_action_bare_id(id text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT b FROM bare_id(id, 'bulk') AS b WHERE b ~ '^c[0-9a-z]{24}$'
$$;

-- The action row, wherever this store reads it from: its own table on the control plane, the
-- control plane's through the FDW on run-ops (read by column name). No row when missing.
CREATE OR REPLACE FUNCTION runops.load_bulk_action(bare text)
RETURNS SETOF runops.bulk_actions
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF local_residency() = 'LEGACY' THEN
    RETURN QUERY SELECT * FROM bulk_actions AS a WHERE a.id = bare;
  ELSIF peer_wired() THEN
    BEGIN
      RETURN QUERY SELECT (jsonb_populate_record(NULL::bulk_actions, to_jsonb(a))).*
                   FROM runops_peer.bulk_actions AS a WHERE a.id = bare;
    EXCEPTION WHEN connection_exception THEN
      PERFORM raise_error('RO009', 'the control-plane store, which holds bulk actions, is unavailable: ' || SQLERRM);
    WHEN undefined_table THEN
      PERFORM raise_error('RO009', 'this store''s view of the control plane predates bulk actions: run runops migrate');
    END;
  END IF;
END
$$;

-- An action as get_bulk_action shows it: both stores' progress rows summed. A part's processed
-- count is its furthest walk (after a mint-kind flip a REPLAY part may have been walked by both
-- stores, the second time finding its replays made); affected counts add up (a replay found made
-- is not counted again). An open action whose parts are all finished reads COMPLETED at once,
-- before the control plane's tick records it.
CREATE OR REPLACE FUNCTION runops.bulk_action_row_of(a runops.bulk_actions)
RETURNS runops.bulk_action_row
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  result bulk_action_row;
  progress jsonb := '[]';
  parts record;
BEGIN
  SELECT coalesce(jsonb_agg(to_jsonb(p)), '[]') INTO progress
  FROM bulk_action_progress AS p WHERE p.bulk_action_id = a.id;
  IF peer_wired() AND (a.matched_legacy > 0 OR a.matched_new > 0) THEN
    BEGIN
      progress := progress || (SELECT coalesce(jsonb_agg(to_jsonb(p)), '[]')
                               FROM runops_peer.bulk_action_progress AS p WHERE p.bulk_action_id = a.id);
    EXCEPTION WHEN connection_exception THEN
      PERFORM raise_error('RO009', 'the other store is unavailable to report its part of bulk action bulk_'
                                   || a.id || ': ' || SQLERRM);
    WHEN undefined_table THEN
      -- Upgraded, but the FDW not re-imported since (`runops migrate` does it).
      PERFORM raise_error('RO009', 'this store''s view of the other store predates bulk actions: run runops migrate');
    END;
  END IF;
  WITH p AS (
    SELECT x.part, max(x.processed_count) AS processed, sum(x.affected_count) AS affected,
           max(x.finished_at) AS finished_at
    FROM jsonb_populate_recordset(NULL::bulk_action_progress, progress) AS x
    GROUP BY x.part
  ), need AS (
    SELECT n.part, n.matched, p.processed, p.affected, p.finished_at
    FROM (VALUES ('LEGACY', a.matched_legacy), ('NEW', a.matched_new)) AS n(part, matched)
    LEFT JOIN p ON p.part = n.part
  )
  SELECT coalesce(sum(need.processed), 0)::integer AS processed, coalesce(sum(need.affected), 0)::integer AS affected,
         bool_and(need.matched = 0 OR need.finished_at IS NOT NULL) AS finished,
         max(need.finished_at) AS finished_at
  INTO parts FROM need;
  result.bulk_action_id := 'bulk_' || a.id;
  result.environment_id := a.environment_id;
  result.kind := a.kind;
  result.filters := a.filters;
  result.created_at := a.created_at;
  result.matched_count := a.matched_legacy + a.matched_new;
  result.processed_count := parts.processed;
  result.affected_count := parts.affected;
  IF a.status IN ('COMPLETED', 'ABORTED') THEN
    result.status := a.status;
    result.completed_at := a.completed_at;
  ELSIF parts.finished THEN
    result.status := 'COMPLETED';
    result.completed_at := coalesce(parts.finished_at, a.created_at);
  ELSE
    result.status := CASE WHEN parts.processed > 0 THEN 'PROCESSING' ELSE 'PENDING' END;
  END IF;
  RETURN result;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_bulk_action(environment_id text, kind text, filters jsonb DEFAULT '{}',
                                                     options jsonb DEFAULT '{}')
RETURNS TABLE (bulk_action_id text, is_cached boolean, status text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  f list_filters;
  o jsonb := require_object(options, 'options');
  key text;
  reason text;
  chunk integer;
  ctx environment_context;
  ts timestamptz := now();
  new_id text;
  existing bulk_actions;
  n_legacy integer := 0;
  n_new integer := 0;
BEGIN
  -- RO006 first (SPEC §3's order): the kind, the filter (list_runs' own parser), the options.
  IF kind IS NULL OR kind NOT IN ('CANCEL', 'REPLAY') THEN
    PERFORM raise_invalid('kind', 'CANCEL or REPLAY', quote_nullable(input_prefix(kind)));
  END IF;
  f := parse_list_filters(filters);
  PERFORM reject_unknown_options(o, ARRAY['idempotency_key', 'reason', 'chunk_size'], 'bulk action');
  key := option_idempotency_key(o);
  reason := option_text(o, 'reason');
  IF reason IS NOT NULL AND kind <> 'CANCEL' THEN
    PERFORM raise_error('RO006', 'option reason is for CANCEL actions');
  END IF;
  chunk := coalesce(option_integer(o, 'chunk_size', 1, 100000), default_bulk_chunk_size());
  IF environment_id IS NULL OR environment_id = '' THEN
    PERFORM raise_error('RO006', 'environment_id is required');
  END IF;
  -- The action's home is the control plane, beside the tenant it belongs to.
  IF local_residency() <> 'LEGACY' THEN
    PERFORM raise_wrong_store('bulk action of environment', environment_id, 'CONTROL_PLANE');
  END IF;
  ctx := load_environment(environment_id);
  IF ctx.id IS NULL THEN
    PERFORM raise_error('RO004', format('environment %s not found', quote_literal(input_prefix(environment_id))));
  END IF;
  -- A replay is new work (RO005 on a paused or archived environment); a cancel is not.
  IF kind = 'REPLAY' THEN
    PERFORM require_usable(ctx, environment_id);
  END IF;
  IF key IS NOT NULL THEN
    SELECT * INTO existing FROM bulk_actions AS a
    WHERE a.environment_id = create_bulk_action.environment_id AND a.idempotency_key = key;
    IF FOUND THEN
      RETURN QUERY SELECT 'bulk_' || existing.id, true, (bulk_action_row_of(existing)).status;
      RETURN;
    END IF;
  END IF;
  new_id := generate_cuid();
  INSERT INTO bulk_actions AS a (id, environment_id, kind, status, filters, reason, idempotency_key, chunk_size,
                                 matched_legacy, matched_new, created_at)
  VALUES (new_id, create_bulk_action.environment_id, kind, 'PENDING', coalesce(filters, '{}'), reason, key, chunk,
          0, 0, ts)
  ON CONFLICT ON CONSTRAINT bulk_actions_environment_id_idempotency_key_key DO NOTHING;
  IF NOT FOUND THEN
    -- A concurrent create with the same key committed first: its action is the answer.
    SELECT * INTO existing FROM bulk_actions AS a
    WHERE a.environment_id = create_bulk_action.environment_id AND a.idempotency_key = key;
    RETURN QUERY SELECT 'bulk_' || existing.id, true, (bulk_action_row_of(existing)).status;
    RETURN;
  END IF;
  -- The matched set, fixed now: list_runs' predicate (listing.sql), on both stores, bounded by
  -- the action's creation time.
  INSERT INTO bulk_action_members (bulk_action_id, residency, run_id)
  SELECT new_id, 'LEGACY', v.id FROM run_view AS v
  WHERE v.environment_id = create_bulk_action.environment_id AND v.created_at <= ts
    AND (f.statuses IS NULL OR v.status = ANY (f.statuses))
    AND (f.task_identifiers IS NULL OR v.task_identifier = ANY (f.task_identifiers))
    AND (f.tags IS NULL OR v.tags @> f.tags)
    AND (f.created_after IS NULL OR v.created_at > f.created_after)
    AND (f.created_before IS NULL OR v.created_at < f.created_before)
    AND (f.batch_id IS NULL OR v.batch_id = f.batch_id);
  GET DIAGNOSTICS n_legacy = ROW_COUNT;
  IF claims_required() THEN
    BEGIN
      INSERT INTO bulk_action_members (bulk_action_id, residency, run_id)
      SELECT new_id, 'NEW', v.id FROM runops_peer.run_view AS v
      WHERE v.environment_id = create_bulk_action.environment_id AND v.created_at <= ts
        AND (f.statuses IS NULL OR v.status = ANY (f.statuses))
        AND (f.task_identifiers IS NULL OR v.task_identifier = ANY (f.task_identifiers))
        AND (f.tags IS NULL OR v.tags @> f.tags)
        AND (f.created_after IS NULL OR v.created_at > f.created_after)
        AND (f.created_before IS NULL OR v.created_at < f.created_before)
        AND (f.batch_id IS NULL OR v.batch_id = f.batch_id);
      GET DIAGNOSTICS n_new = ROW_COUNT;
    EXCEPTION WHEN connection_exception THEN
      PERFORM raise_error('RO009', 'the run-ops store is unavailable, so the runs a bulk action matches there '
                                   || 'cannot be fixed: ' || SQLERRM, NULL, 'retry when it is back');
    END;
  END IF;
  UPDATE bulk_actions AS a
  SET matched_legacy = n_legacy, matched_new = n_new,
      status = CASE WHEN n_legacy + n_new = 0 THEN 'COMPLETED' ELSE 'PENDING' END,
      completed_at = CASE WHEN n_legacy + n_new = 0 THEN ts END
  WHERE a.id = new_id;
  RETURN QUERY SELECT 'bulk_' || new_id, false, CASE WHEN n_legacy + n_new = 0 THEN 'COMPLETED' ELSE 'PENDING' END;
END
$$;

CREATE OR REPLACE FUNCTION runops.get_bulk_action(bulk_action_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.bulk_action_row
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := bulk_action_bare_id(bulk_action_id);
  a bulk_actions;
BEGIN
  IF bare IS NULL THEN
    RETURN;  -- a read answers "no row" for an id that cannot be a bulk action's
  END IF;
  SELECT * INTO a FROM load_bulk_action(bare);
  IF a.id IS NULL OR (get_bulk_action.environment_id IS NOT NULL AND a.environment_id <> get_bulk_action.environment_id) THEN
    RETURN;
  END IF;
  RETURN NEXT bulk_action_row_of(a);
END
$$;

CREATE OR REPLACE FUNCTION runops.abort_bulk_action(bulk_action_id text)
RETURNS SETOF runops.bulk_action_row
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := bulk_action_bare_id(bulk_action_id);
  a bulk_actions;
BEGIN
  IF bulk_action_id IS NULL OR bulk_action_id = '' THEN
    PERFORM raise_error('RO006', 'bulk_action_id is required');
  END IF;
  IF bare IS NULL THEN
    PERFORM raise_error('RO006', format('bulk_action_id %s is not a bulk action id', input_prefix(bulk_action_id)),
                        NULL, 'pass the id create_bulk_action returned (bulk_<id>)');
  END IF;
  IF local_residency() <> 'LEGACY' THEN
    PERFORM raise_wrong_store('bulk action', bulk_action_id, 'CONTROL_PLANE');
  END IF;
  -- Waits for a chunk in flight on this store (it holds the row FOR SHARE), so none starts
  -- after this commits; the other store's chunk in flight may still finish (docs: Bulk actions).
  UPDATE bulk_actions AS x SET status = 'ABORTED', completed_at = now()
  WHERE x.id = bare AND x.status IN ('PENDING', 'PROCESSING')
  RETURNING * INTO a;
  IF NOT FOUND THEN
    SELECT * INTO a FROM bulk_actions AS x WHERE x.id = bare;
    IF NOT FOUND THEN
      PERFORM raise_error('RO004', format('bulk action %s not found', input_prefix(bulk_action_id)));
    END IF;
  END IF;
  -- An action that was over already is answered as it is (aborting twice is fine).
  RETURN NEXT bulk_action_row_of(a);
END
$$;

-- The members of one part after the cursor, in id order: this store's table on the control
-- plane, the control plane's through the FDW (a shipped keyset scan of its primary key) on run-ops.
CREATE OR REPLACE FUNCTION runops.next_bulk_members(action_id text, part text, after_id text, n integer)
RETURNS text[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  ids text[];
BEGIN
  IF local_residency() = 'LEGACY' THEN
    SELECT array_agg(m.run_id ORDER BY m.run_id) INTO ids FROM (
      SELECT m.run_id FROM bulk_action_members AS m
      WHERE m.bulk_action_id = action_id AND m.residency = part AND m.run_id > after_id
      ORDER BY m.run_id LIMIT n) AS m;
  ELSE
    SELECT array_agg(m.run_id ORDER BY m.run_id) INTO ids FROM (
      SELECT m.run_id FROM runops_peer.bulk_action_members AS m
      WHERE m.bulk_action_id = action_id AND m.residency = part AND m.run_id > after_id
      ORDER BY m.run_id LIMIT n) AS m;
  END IF;
  RETURN coalesce(ids, '{}');
END
$$;

-- CANCEL of one chunk of this store's runs: cancel_run's own move (cancel_trees: the live runs
-- and their live children, locked descendants first), with the action's reason. Returns how many
-- of the chunk's runs this transaction cancelled: those it found live and that now carry its
-- cancel (completed at this transaction's time) — a run another transaction finished or
-- cancelled in between is skipped, not counted.
CREATE OR REPLACE FUNCTION runops.cancel_bulk_chunk(a runops.bulk_actions, ids text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  live text[];
  n integer := 0;
BEGIN
  SELECT array_agg(r.id ORDER BY r.id) INTO live FROM runs AS r
  WHERE r.id = ANY (ids) AND NOT is_final_status(r.status);
  IF live IS NOT NULL THEN
    PERFORM cancel_trees(live, coalesce(a.reason, 'canceled by bulk action bulk_' || a.id));
    SELECT count(*) INTO n FROM runs AS r
    WHERE r.id = ANY (live) AND r.status = 'CANCELED' AND r.completed_at = ts;
  END IF;
  RETURN n;
END
$$;

-- REPLAY of one chunk (members of either store), on the store the environment mints on: one
-- replay_run per original, keyed bulk_<action>:<run>, so a chunk done again — or a part walked
-- again by the other store after a mint-kind flip — finds its replays made (is_cached) rather
-- than making second ones. Returns how many it made. An original that is gone (purged) is skipped.
CREATE OR REPLACE FUNCTION runops.replay_bulk_chunk(a runops.bulk_actions, ids text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  original text;
  answer record;
  made integer := 0;
BEGIN
  FOREACH original IN ARRAY ids LOOP
    BEGIN
      SELECT * INTO answer FROM replay_run('run_' || original,
        jsonb_build_object('idempotency_key', 'bulk_' || a.id || ':' || original, 'environment_id', a.environment_id));
    EXCEPTION WHEN SQLSTATE 'RO004' THEN
      CONTINUE;  -- purged since the action was created: processed, nothing to replay
    END;
    IF NOT answer.is_cached THEN
      made := made + 1;
    END IF;
  END LOOP;
  RETURN made;
END
$$;

-- One chunk of one part of one action, on this store. Returns the members processed (0: nothing
-- to do here now — another processor holds the part, the part is finished, or the action is over).
CREATE OR REPLACE FUNCTION runops.advance_bulk_part(a runops.bulk_actions, part text, n integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  p bulk_action_progress;
  ids text[];
  affected integer := 0;
BEGIN
  -- One processor per part and store, never waiting: a transaction-scoped advisory lock (taken
  -- before the progress row may exist, so two first chunks never wait on each other's INSERT),
  -- then the row itself FOR UPDATE SKIP LOCKED.
  IF NOT pg_try_advisory_xact_lock(hashtextextended('runops.bulk_action:' || a.id || ':' || part, 1919250031)) THEN
    RETURN 0;
  END IF;
  SELECT * INTO p FROM bulk_action_progress AS x
  WHERE x.bulk_action_id = a.id AND x.part = advance_bulk_part.part FOR UPDATE SKIP LOCKED;
  IF NOT FOUND THEN
    INSERT INTO bulk_action_progress AS x (bulk_action_id, part, updated_at)
    VALUES (a.id, advance_bulk_part.part, ts)
    ON CONFLICT DO NOTHING
    RETURNING * INTO p;
    IF NOT FOUND THEN
      RETURN 0;  -- there, but locked by something else
    END IF;
  END IF;
  IF p.finished_at IS NOT NULL THEN
    RETURN 0;
  END IF;
  -- On the control plane the action row is held FOR SHARE while the chunk runs: abort waits for
  -- it, and a chunk starting after an abort committed sees ABORTED here and does nothing.
  IF local_residency() = 'LEGACY' THEN
    PERFORM FROM bulk_actions AS x WHERE x.id = a.id AND x.status IN ('PENDING', 'PROCESSING') FOR SHARE;
    IF NOT FOUND THEN
      RETURN 0;
    END IF;
  END IF;
  BEGIN
    ids := next_bulk_members(a.id, part, coalesce(p.last_run_id, ''), n);
    IF a.kind = 'CANCEL' THEN
      affected := cancel_bulk_chunk(a, ids);
    ELSE
      affected := replay_bulk_chunk(a, ids);
    END IF;
    UPDATE bulk_action_progress AS x
    SET last_run_id = coalesce(ids[cardinality(ids)], x.last_run_id),
        processed_count = x.processed_count + cardinality(ids),
        affected_count = x.affected_count + affected,
        finished_at = CASE WHEN cardinality(ids) < n THEN ts END,
        updated_at = ts, last_error = NULL
    WHERE x.bulk_action_id = a.id AND x.part = advance_bulk_part.part;
  EXCEPTION WHEN OTHERS THEN
    -- The chunk is undone whole (a deadlock, the other store down, a paused environment for a
    -- replay): the next call does it again. Why is kept for the operator.
    UPDATE bulk_action_progress AS x SET last_error = left(SQLSTATE || ': ' || SQLERRM, 512), updated_at = ts
    WHERE x.bulk_action_id = a.id AND x.part = advance_bulk_part.part;
    RETURN 0;
  END;
  RETURN cardinality(ids);
END
$$;

-- Records, on the control plane, the actions whose every part is finished (wherever it was
-- walked), and deletes the members of actions that are over, max_rows at a time.
CREATE OR REPLACE FUNCTION runops.settle_bulk_actions(max_rows integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  a bulk_actions;
  shown bulk_action_row;
  settled integer := 0;
  gone integer;
BEGIN
  FOR a IN SELECT * FROM bulk_actions AS x WHERE x.status IN ('PENDING', 'PROCESSING')
           ORDER BY x.created_at LIMIT 100 FOR UPDATE SKIP LOCKED
  LOOP
    BEGIN
      shown := bulk_action_row_of(a);
    EXCEPTION WHEN SQLSTATE 'RO009' THEN
      CONTINUE;  -- the other store's part cannot be read now: the next tick looks again
    END;
    IF shown.status <> a.status AND shown.status IN ('PROCESSING', 'COMPLETED') THEN
      UPDATE bulk_actions AS x SET status = shown.status, completed_at = shown.completed_at WHERE x.id = a.id;
      settled := settled + (shown.status = 'COMPLETED')::integer;
    END IF;
  END LOOP;
  FOR a IN SELECT * FROM bulk_actions AS x
           WHERE x.status IN ('COMPLETED', 'ABORTED') AND NOT x.members_pruned
           ORDER BY x.completed_at LIMIT 10 FOR UPDATE SKIP LOCKED
  LOOP
    DELETE FROM bulk_action_members AS m
    WHERE (m.bulk_action_id, m.residency, m.run_id) IN (
      SELECT d.bulk_action_id, d.residency, d.run_id FROM bulk_action_members AS d
      WHERE d.bulk_action_id = a.id LIMIT max_rows);
    GET DIAGNOSTICS gone = ROW_COUNT;
    IF gone < max_rows THEN
      UPDATE bulk_actions AS x SET members_pruned = true WHERE x.id = a.id;
    END IF;
  END LOOP;
  RETURN settled;
END
$$;

-- One chunk of every open action's parts this store acts on (max_runs each, NULL: each
-- action's chunk_size). Returns the runs processed. Safe to call from any number of processes.
CREATE OR REPLACE FUNCTION runops.advance_bulk_actions(max_runs integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  a bulk_actions;
  open_actions bulk_actions[];
  part text;
  mints_here boolean;
  done integer := 0;
BEGIN
  IF max_runs IS NOT NULL THEN
    PERFORM require_between(max_runs, 1, 100000, 'max_runs');
  END IF;
  IF local_residency() = 'LEGACY' THEN
    SELECT array_agg(x ORDER BY x.created_at) INTO open_actions FROM (
      SELECT * FROM bulk_actions AS x WHERE x.status IN ('PENDING', 'PROCESSING') ORDER BY x.created_at LIMIT 100) AS x;
  ELSIF peer_wired() THEN
    BEGIN
      SELECT array_agg(jsonb_populate_record(NULL::bulk_actions, to_jsonb(x)) ORDER BY x.created_at) INTO open_actions
      FROM (SELECT * FROM runops_peer.bulk_actions AS x WHERE x.status IN ('PENDING', 'PROCESSING')
            ORDER BY x.created_at LIMIT 100) AS x;
    EXCEPTION WHEN connection_exception OR undefined_table THEN
      -- The control plane is unavailable (the next call looks again), or this store's view of it
      -- predates bulk actions (upgraded, not yet re-wired by `runops migrate`): nothing to do here.
      RETURN 0;
    END;
  END IF;
  FOREACH a IN ARRAY coalesce(open_actions, '{}') LOOP
    IF a.kind = 'CANCEL' THEN
      -- Each store cancels its own runs.
      IF (CASE local_residency() WHEN 'LEGACY' THEN a.matched_legacy ELSE a.matched_new END) > 0 THEN
        done := done + advance_bulk_part(a, local_residency(), least(coalesce(max_runs, a.chunk_size), a.chunk_size));
      END IF;
    ELSE
      -- The environment's minting store replays both parts.
      BEGIN
        mints_here := root_residency(load_environment(a.environment_id)) = local_residency();
      EXCEPTION WHEN OTHERS THEN
        mints_here := false;
      END;
      CONTINUE WHEN NOT mints_here;
      FOREACH part IN ARRAY ARRAY['LEGACY', 'NEW'] LOOP
        IF (CASE part WHEN 'LEGACY' THEN a.matched_legacy ELSE a.matched_new END) > 0 THEN
          done := done + advance_bulk_part(a, part, least(coalesce(max_runs, a.chunk_size), a.chunk_size));
        END IF;
      END LOOP;
    END IF;
  END LOOP;
  PERFORM set_mover('');
  RETURN done;
END
$$;
