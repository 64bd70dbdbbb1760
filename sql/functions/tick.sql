-- tick: the time-driven steps of one store. Every time comparison reads runops.now() in this store.
-- Each step claims its rows with FOR UPDATE SKIP LOCKED, so ticks running at once on one store
-- never process a row twice: a row another tick holds is simply left to it.

-- A run whose timer has come goes to PENDING: a DELAYED one at delay_until, its TTL clock starting
-- now; a RETRYING_AFTER_FAILURE one at retry_at, to the back of the queue. One step, from_status,
-- a call (enqueue_delayed_runs, requeue_retries), each its own mover and its own max_runs.
-- from_status is a parameter, so a generic plan cannot prove runs_timer_idx's predicate from it:
-- the constant IN list does, and the plan stays the index scan in wake_at order it was with the
-- status spelled out (the status was a filter on that scan either way).
CREATE OR REPLACE FUNCTION runops.wake_due_runs(from_status text, max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
BEGIN
  PERFORM set_mover(CASE from_status WHEN 'DELAYED' THEN 'enqueue_delayed_runs' ELSE 'requeue_retries' END);
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status IN ('DELAYED', 'RETRYING_AFTER_FAILURE') AND r.status = from_status
      AND wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) <= ts
    ORDER BY wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) LIMIT max_runs FOR UPDATE SKIP LOCKED
  )
  UPDATE runs AS r
  SET status = 'PENDING', queued_at = ts, updated_at = ts,
      ttl_expires_at = CASE r.status WHEN 'DELAYED' THEN ts + r.ttl ELSE r.ttl_expires_at END,
      retry_at = CASE r.status WHEN 'RETRYING_AFTER_FAILURE' THEN NULL ELSE r.retry_at END
  FROM due WHERE r.id = due.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- DELAYED -> PENDING once delay_until has come; the TTL clock starts now.
CREATE OR REPLACE FUNCTION runops.enqueue_delayed_runs(max_runs integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM require_between(max_runs, 1, 100000, 'max_runs');
  RETURN wake_due_runs('DELAYED', max_runs);
END
$$;

-- PENDING runs never locked by a worker, whose TTL has run out (now >= queued_at + ttl), become
-- EXPIRED; their key is released and their RUN waitpoint completes with the error.
CREATE OR REPLACE FUNCTION runops.expire_enqueued_runs(max_runs integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  ts timestamptz := now();
  expired text[];
  keyed text[];
BEGIN
  PERFORM require_between(max_runs, 1, 100000, 'max_runs');
  PERFORM set_mover('expire_enqueued_runs');
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status = 'PENDING' AND r.ttl_expires_at IS NOT NULL AND r.started_at IS NULL
      AND wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) <= ts
    ORDER BY wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) LIMIT max_runs FOR UPDATE SKIP LOCKED
  ), moved AS (
    UPDATE runs AS r
    SET status = 'EXPIRED', expired_at = ts, completed_at = ts, ttl_expires_at = NULL, updated_at = ts,
        error = jsonb_build_object('message', format('run expired because its TTL (%s) was reached', duration_text(r.ttl)),
                                   'status', 'EXPIRED')
    FROM due WHERE r.id = due.id
    RETURNING r.id, r.idempotency_key_hash
  )
  SELECT coalesce(array_agg(m.id), '{}'), array_agg(m.id) FILTER (WHERE m.idempotency_key_hash IS NOT NULL)
  INTO expired, keyed FROM moved AS m;
  -- EXPIRED releases its key (run_statuses): dedup would ignore it anyway, but an expired run is
  -- let go of at once, so reads show no key on it.
  IF keyed IS NOT NULL THEN
    PERFORM release_idempotency_keys(keyed, NULL);
  END IF;
  RETURN cardinality(expired);
END
$$;

-- A worker that stopped heartbeating loses its run: back to PENDING for another worker (its
-- attempt is failed; the next start_attempt counts towards max_attempts). No run stays
-- DEQUEUED or EXECUTING forever.
CREATE OR REPLACE FUNCTION runops.release_lapsed_leases(max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  released text[];
BEGIN
  PERFORM set_mover('release_lapsed_leases');
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status IN ('DEQUEUED', 'EXECUTING') AND r.lease_expires_at <= ts
    ORDER BY r.lease_expires_at LIMIT max_runs FOR UPDATE SKIP LOCKED
  ), moved AS (
    UPDATE runs AS r
    SET status = 'PENDING', locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
    FROM due WHERE r.id = due.id
    RETURNING r.id
  )
  SELECT coalesce(array_agg(m.id), '{}') INTO released FROM moved AS m;
  UPDATE attempts AS a
  SET status = 'FAILED', completed_at = ts,
      error = jsonb_build_object('message', 'the worker''s lease lapsed (no heartbeat)')
  WHERE a.run_id = ANY (released) AND a.status = 'EXECUTING';
  RETURN cardinality(released);
END
$$;

-- Concurrency slots held by no DEQUEUED/EXECUTING run go free. The status guard gives a slot back
-- in the transaction that ends its run, so this finds only what a write bypassing the triggers
-- left (session_replication_role = replica, a hand-made DELETE); a slot above a lowered limit
-- goes with it. Its run is locked (SKIP LOCKED) so a run changing status meanwhile is left alone.
CREATE OR REPLACE FUNCTION runops.free_orphaned_slots(max_rows integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  n integer := 0;
  s record;
BEGIN
  FOR s IN SELECT o.environment_id, o.slot, o.run_id FROM concurrency_slots AS o
           WHERE o.run_id IS NOT NULL
             AND NOT EXISTS (SELECT FROM runs AS r WHERE r.id = o.run_id AND r.status IN ('DEQUEUED', 'EXECUTING'))
           ORDER BY o.environment_id, o.slot LIMIT max_rows FOR UPDATE OF o SKIP LOCKED
  LOOP
    CONTINUE WHEN EXISTS (SELECT FROM runs AS r WHERE r.id = s.run_id AND r.status IN ('DEQUEUED', 'EXECUTING'));
    UPDATE concurrency_slots AS o SET run_id = NULL
    WHERE o.environment_id = s.environment_id AND o.slot = s.slot;
    PERFORM settle_overflow_slot(s.environment_id, s.slot);
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

-- RETRYING_AFTER_FAILURE -> PENDING at retry_at (to the back of the queue).
CREATE OR REPLACE FUNCTION runops.requeue_retries(max_runs integer)
RETURNS integer
LANGUAGE sql VOLATILE
AS $$
  SELECT wake_due_runs('RETRYING_AFTER_FAILURE', max_runs)
$$;

-- EXECUTING past attempt start + max_duration -> TIMED_OUT.
CREATE OR REPLACE FUNCTION runops.enforce_max_duration(max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
BEGIN
  PERFORM set_mover('enforce_max_duration');
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status = 'EXECUTING' AND r.execution_deadline <= ts
    ORDER BY r.execution_deadline LIMIT max_runs FOR UPDATE SKIP LOCKED
  )
  UPDATE runs AS r
  SET status = 'TIMED_OUT', completed_at = ts, locked_by = NULL, lease_expires_at = NULL,
      execution_deadline = NULL, updated_at = ts,
      error = jsonb_build_object('message', format('run exceeded its max_duration (%s)', duration_text(r.max_duration)),
                                 'status', 'TIMED_OUT')
  FROM due WHERE r.id = due.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Due DATETIME waitpoints complete; MANUAL ones past their timeout complete with an error.
-- Either way their local edges complete and the runs they were the last blocker of resume.
CREATE OR REPLACE FUNCTION runops.complete_due_waitpoints(max_rows integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  w record;
  due text[];
  datetimes integer := 0;
  timeouts integer := 0;
BEGIN
  SELECT array_agg(x.id ORDER BY x.id) INTO due FROM (
    SELECT x.id FROM waitpoints AS x
    WHERE x.status = 'PENDING' AND ((x.type = 'DATETIME' AND x.completed_after <= ts) OR x.timeout_at <= ts)
    ORDER BY x.id LIMIT max_rows FOR UPDATE SKIP LOCKED) AS x;
  IF due IS NULL THEN
    RETURN jsonb_build_object('datetime_waitpoints', 0, 'manual_timeouts', 0);
  END IF;
  -- Lock every run these waitpoints unblock in one id order, before completing any: two ticks
  -- completing different waitpoints of the same runs would otherwise lock them crosswise.
  PERFORM FROM runs AS r
  WHERE r.id IN (SELECT e.run_id FROM run_waitpoints AS e WHERE e.waitpoint_id = ANY (due) AND e.completed_at IS NULL)
  ORDER BY r.id FOR UPDATE;
  FOR w IN SELECT x.id, x.type FROM waitpoints AS x WHERE x.id = ANY (due) ORDER BY x.id
  LOOP
    UPDATE waitpoints AS x
    SET status = 'COMPLETED', completed_at = ts,
        output_is_error = (w.type = 'MANUAL'),
        output = CASE WHEN w.type = 'MANUAL'
                      THEN jsonb_build_object('message', 'waitpoint timed out') END
    WHERE x.id = w.id;
    PERFORM resume_local_waiters(w.id);
    IF w.type = 'DATETIME' THEN datetimes := datetimes + 1; ELSE timeouts := timeouts + 1; END IF;
  END LOOP;
  RETURN jsonb_build_object('datetime_waitpoints', datetimes, 'manual_timeouts', timeouts);
END
$$;

-- WAIT_FOR_* runs whose blockers are all done — including blockers in the other store, read
-- through the FDW — resume. Local completions resume runs at once; this catches the rest (and
-- anything a crash left behind).
CREATE OR REPLACE FUNCTION runops.resume_waiting_runs(max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  candidate text;
  resumed integer := 0;
BEGIN
  FOR candidate IN
    SELECT r.id FROM runs AS r
    WHERE r.status = 'WAITING_TO_RESUME' AND r.suspended_reason IS DISTINCT FROM 'MANUAL'
      AND (NOT EXISTS (SELECT FROM run_waitpoints AS e WHERE e.run_id = r.id AND e.completed_at IS NULL)
           OR EXISTS (SELECT FROM run_waitpoints AS e WHERE e.run_id = r.id AND e.completed_at IS NULL
                      AND try_classify_residency(e.waitpoint_id) <> local_residency()))
    ORDER BY r.updated_at LIMIT max_runs FOR UPDATE SKIP LOCKED
  LOOP
    BEGIN
      PERFORM refresh_blockers(candidate, true);
    EXCEPTION WHEN SQLSTATE 'RO009' THEN
      CONTINUE;  -- the other store is down: try again on the next tick
    END;
    IF resume_if_unblocked(candidate, false) THEN
      resumed := resumed + 1;
    ELSE
      -- Still blocked: to the back of the line, so the next tick looks at others first.
      UPDATE runs AS r SET updated_at = now() WHERE r.id = candidate;
    END IF;
  END LOOP;
  RETURN resumed;
END
$$;

-- The mirror pull as a tick step, on the run-ops store: every tick under the pull engine; under
-- logical replication, while the apply worker runs, once the mirror is two thirds of the bound
-- old all the same, and otherwise (replication is not applying) once it is 10 s old, or a third
-- of the bound if that is less, so the pull has refreshed it well before the bound turns new
-- work away. An unreachable
-- control plane must not roll back the rest of the tick's work (-1 says it failed; the next
-- tick tries again).
CREATE OR REPLACE FUNCTION runops.pull_mirror_for_tick()
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  IF local_residency() <> 'NEW' THEN
    RETURN 0;
  END IF;
  -- While the apply worker runs, its keepalives feed the mirror at least every 30 s: pull only if
  -- the feed is two thirds of the bound old all the same (a walsender that fell behind).
  IF mirror_subscribed()
     AND mirror_fed_at() > pg_catalog.now() - pg_catalog.make_interval(
           secs => (SELECT CASE WHEN mirror_replicated_at() IS NOT NULL THEN c.mirror_freshness_seconds * 2 / 3.0
                                ELSE least(10, c.mirror_freshness_seconds / 3.0) END
                    FROM store_config AS c)) THEN
    RETURN 0;
  END IF;
  RETURN pull_tenant_mirror();
EXCEPTION WHEN connection_exception THEN
  RETURN -1;
END
$$;

-- One pass of all time-driven work in this store. Safe to run from many processes at once.
CREATE OR REPLACE FUNCTION runops.tick(max_rows integer DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(max_rows, 1, 100000, 'max_rows');
  counts jsonb;
BEGIN
  counts := jsonb_build_object(
    'delayed', enqueue_delayed_runs(n),
    'retried', requeue_retries(n),
    'expired', expire_enqueued_runs(n),
    'timed_out', enforce_max_duration(n),
    'leases_released', release_lapsed_leases(n),
    'slots_freed', free_orphaned_slots(n));
  counts := counts || complete_due_waitpoints(n)
            || jsonb_build_object('batches_aborted', abort_unsealed_batches(n),
                                  'batches_finished_remote', finish_remote_batches(n));
  counts := counts || jsonb_build_object('resumed', resume_waiting_runs(n), 'mirror', pull_mirror_for_tick());
  -- Bulk actions: a chunk of at most n runs of each open action's part here (the worker process
  -- drives them at full chunk size between ticks); the control plane records finished ones.
  counts := counts || jsonb_build_object('bulk_processed', advance_bulk_actions(n));
  IF local_residency() = 'LEGACY' THEN
    counts := counts || jsonb_build_object('bulk_settled', settle_bulk_actions(n));
  END IF;
  -- Registrations of workers that stopped renewing them (gone without a word).
  DELETE FROM waiting_workers AS w WHERE w.expires_at <= pg_catalog.now();
  IF local_residency() = 'NEW' THEN
    counts := counts || jsonb_build_object('claims_pruned', prune_claims(n));
    PERFORM beat('run_ops_tick');
  ELSE
    -- Replication carries this row to the run-ops store: the tenant mirror's heartbeat.
    PERFORM beat('control_plane_tick');
  END IF;
  PERFORM set_mover('');
  RETURN counts;
END
$$;

-- For installations that schedule tick inside PostgreSQL with pg_cron (whose Debian build, 1.4,
-- schedules by the minute): a job started every minute ticks every few seconds until the
-- minute is over, committing after each pass so a tick's work is visible at once.
--   SELECT cron.schedule('runops-tick', '* * * * *', 'CALL runops.tick_every(55, 2)');
-- A procedure that commits may not be SECURITY DEFINER or carry SET; it only calls tick().
-- At most 300 s a call (a scheduler's minute fits; no caller pins a backend for longer), and
-- only outside a transaction block, where its COMMIT would fail after the first pass: there,
-- the transaction began before this statement, so now() (the transaction's start) is earlier
-- than statement_timestamp(); a statement that starts its own transaction sees them equal.
CREATE OR REPLACE PROCEDURE runops.tick_every(for_seconds integer, every_seconds integer DEFAULT 2,
                                              max_rows integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
  stop_at timestamptz := pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => for_seconds);
BEGIN
  IF for_seconds IS NULL OR for_seconds NOT BETWEEN 1 AND 300 OR every_seconds IS NULL
     OR every_seconds NOT BETWEEN 1 AND for_seconds THEN
    RAISE EXCEPTION 'tick_every needs 1 to 300 seconds and an interval of 1 s up to that'
      USING ERRCODE = 'RO006';
  END IF;
  IF pg_catalog.now() <> pg_catalog.statement_timestamp() THEN
    RAISE EXCEPTION 'tick_every commits after each pass: CALL it on its own, outside a transaction block'
      USING ERRCODE = 'RO006', HINT = 'use autocommit, or call runops.tick() inside your transaction';
  END IF;
  LOOP
    PERFORM runops.tick(max_rows);
    COMMIT;
    EXIT WHEN pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => every_seconds) > stop_at;
    PERFORM pg_catalog.pg_sleep(every_seconds::double precision);
  END LOOP;
END
$$;

-- The ticker a worker process carries (so no separate `runops tick --loop` is needed): every
-- worker calls this about once a second per store; one of them ticks, the others return NULL at
-- once. A transaction-scoped advisory lock picks the one (no session state, so it works behind
-- PgBouncer in transaction mode and leaves nothing behind when a worker dies), and the store's
-- tick heartbeat says whether a pass ran within `every_seconds`, whoever ran it — a
-- `tick --loop` or pg_cron included — so many workers make about one pass per interval, not one
-- each. Lock key (1919250031, 2): class 1919250031 is runops' (subkey 1 is the split's).
CREATE OR REPLACE FUNCTION runops.tick_when_due(every_seconds integer DEFAULT 1, max_rows integer DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM require_between(every_seconds, 1, 3600, 'every_seconds');
  PERFORM require_between(max_rows, 1, 100000, 'max_rows');
  IF NOT pg_catalog.pg_try_advisory_xact_lock(1919250031, 2) THEN
    RETURN NULL;  -- another process is ticking this store right now
  END IF;
  IF EXISTS (SELECT FROM heartbeats AS h
             WHERE h.source = CASE local_residency() WHEN 'NEW' THEN 'run_ops_tick' ELSE 'control_plane_tick' END
               AND h.beat_at > pg_catalog.now() - pg_catalog.make_interval(secs => every_seconds)) THEN
    RETURN NULL;  -- a pass ran within the interval
  END IF;
  RETURN tick(max_rows);
END
$$;
