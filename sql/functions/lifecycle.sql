-- Lifecycle: the state machine and the worker's path through it.
--
-- Every status change is checked by one trigger (guard_run_status) against
-- runops.status_transitions; the same trigger keeps the concurrency slots, tells listeners of
-- final statuses (of every status where the environment asks) and wakes a worker waiting for new
-- work. Functions name the move they make in the transaction-local setting runops.transition_by;
-- a direct UPDATE without it may make any move the table allows, and none it does not.
--
--   dequeue_runs      PENDING -> DEQUEUED            (lease and a concurrency slot, FOR UPDATE SKIP LOCKED;
--                     PENDING -> EXECUTING            with the start option: start_attempt's move folded in)
--   start_attempt     DEQUEUED -> EXECUTING           (or CRASHED past max_attempts)
--   complete_attempt  EXECUTING -> COMPLETED_SUCCESSFULLY
--   fail_attempt      EXECUTING -> RETRYING_AFTER_FAILURE | a final failure
--   create_checkpoint EXECUTING -> WAITING_TO_RESUME
--   resume_run        WAITING_TO_RESUME -> PENDING   (once nothing blocks it)
--   finalize_run      any live -> any final
--   cancel_run        any live -> CANCELED, down the tree of live children
--   cancel_dev_session_runs            the same for a dev session's live runs
--   execute_tasks_waiting_for_deploy   WAITING_FOR_DEPLOY / PENDING_VERSION -> PENDING
-- Every write naming a run takes an optional trailing environment_id (the environment guard,
-- SPEC §3 [1.2]): lock_run answers RO004 for another environment's run. Outputs, errors and
-- metadata pass check_json_bounds (RO006) before anything is locked.
-- A run that turns final completes the edges waiting on it (its RUN waitpoint) and closes its
-- open attempt, in the same transaction (after_run_final).

-- Which statuses are final: runops.is_final_status, with the vocabulary (sql/schema/20_run_graph.sql).

-- Names the move the next status change makes; returns the previous mover so nested moves
-- (a completion resuming a parent) can restore it.
CREATE OR REPLACE FUNCTION runops.set_mover(mover text)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  previous text := coalesce(current_setting('runops.transition_by', true), '');
BEGIN
  PERFORM set_config('runops.transition_by', coalesce(mover, ''), true);
  RETURN previous;
END
$$;

CREATE OR REPLACE FUNCTION runops.guard_run_status()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  mover text := nullif(current_setting('runops.transition_by', true), '');
  freed integer;
  notify_final boolean;
  notify_every boolean;
BEGIN
  IF NOT EXISTS (SELECT FROM status_transitions AS t
                 WHERE t.from_status = OLD.status AND t.to_status = NEW.status
                   AND (mover IS NULL OR t.made_by = mover)) THEN
    PERFORM raise_error('RO003',
      format('run run_%s cannot move from %s to %s%s', OLD.id, OLD.status, NEW.status,
             CASE WHEN mover IS NULL THEN '' ELSE ' by ' || mover END),
      NULL, CASE WHEN is_final_status(OLD.status) THEN 'a final run never changes again' END);
  END IF;
  -- The concurrency slot (sql/schema/45_concurrency_slots.sql): a run leaving DEQUEUED/EXECUTING
  -- gives its slot back in the same transaction, whoever moves it; one entering them outside
  -- dequeue_runs (which hands out slots with the runs) takes a free one or is refused.
  IF OLD.status IN ('DEQUEUED', 'EXECUTING') THEN
    IF NEW.status NOT IN ('DEQUEUED', 'EXECUTING') THEN
      UPDATE concurrency_slots AS s SET run_id = NULL WHERE s.run_id = OLD.id RETURNING s.slot INTO freed;
      -- Overflow exists when the environment's highest slot is above its limit: one probe at the
      -- end of the slot index (max), where a join on slot > slot_limit read every slot of the
      -- environment (20,000 rows, 3 ms, at every run's end under a limit of 20,000).
      IF freed IS NOT NULL
         AND (SELECT max(o.slot) FROM concurrency_slots AS o WHERE o.environment_id = OLD.environment_id)
             > (SELECT l.slot_limit FROM concurrency_limits AS l WHERE l.environment_id = OLD.environment_id) THEN
        PERFORM settle_overflow_slot(OLD.environment_id, freed);
      END IF;
    END IF;
  ELSIF NEW.status IN ('DEQUEUED', 'EXECUTING') AND mover IS DISTINCT FROM 'dequeue_runs' THEN
    PERFORM take_concurrency_slot(NEW.environment_id, NEW.id);
  END IF;
  -- Who hears of it (SPEC §4 Notifications [1.3]): a final status always (unless the environment
  -- turned notifications off), an intermediate one only when the environment asked for every
  -- status. PostgreSQL serialises the commits of all notifying transactions of a database, so a
  -- notification on every move capped the run loop. An environment missing from this store's
  -- tenant tables (a mirror not yet synced) takes the default. Committed with the change, so a
  -- listener never hears of a status that was rolled back.
  SELECT e.notifications, e.notify_every_status INTO notify_final, notify_every
  FROM runtime_environments AS e WHERE e.id = NEW.environment_id;
  IF (CASE WHEN is_final_status(NEW.status) THEN notify_final IS DISTINCT FROM false ELSE notify_every END) THEN
    PERFORM pg_notify('runops_env_' || NEW.environment_id,
                      json_build_object('run_id', 'run_' || NEW.id, 'old_status', OLD.status,
                                        'new_status', NEW.status, 'at', NEW.updated_at)::text);
  END IF;
  -- New work for a waiting worker (sql/schema/46_waiting_workers.sql); new runs are seen by
  -- wake_for_new_runs.
  IF NEW.status = 'PENDING' AND EXISTS (SELECT FROM waiting_workers) THEN
    PERFORM wake_waiting_workers(NEW.environment_id, ARRAY[NEW.queue], ARRAY[NEW.task_identifier], 1);
  END IF;
  RETURN NEW;
END
$$;

-- Lays an environment's concurrency slots out for slot_limit (its maximum_concurrency_limit as
-- the caller read it): on its first dequeue here, and after the limit changed. Idempotent, and
-- it locks only what it changes — its environment's limit row (one layout at a time) and the
-- slot rows it adds, deletes or moves — so dequeues running meanwhile keep claiming the other
-- slots. A lowered limit deletes the free slots above it; runs holding slots above it keep them
-- (overflow) until they end, each moving into a free slot at or below the limit while there is
-- one. A leased run holding no slot (leased before this store had slots, or moved by a write
-- that bypassed the triggers) takes one, above the limit if need be.
CREATE OR REPLACE FUNCTION runops.layout_concurrency_slots(of_environment text, slot_limit integer)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  laid integer;
  high record;
  low integer;
  unslotted text;
BEGIN
  -- A concurrent first layout's row is waited for here; if it laid out the same limit, done.
  INSERT INTO concurrency_limits AS l (environment_id, slot_limit)
  VALUES (of_environment, layout_concurrency_slots.slot_limit)
  ON CONFLICT (environment_id) DO NOTHING
  RETURNING l.slot_limit INTO laid;
  IF laid IS NULL THEN
    SELECT l.slot_limit INTO laid FROM concurrency_limits AS l WHERE l.environment_id = of_environment FOR UPDATE;
    IF laid = layout_concurrency_slots.slot_limit THEN
      RETURN;
    END IF;
    UPDATE concurrency_limits AS l SET slot_limit = layout_concurrency_slots.slot_limit
    WHERE l.environment_id = of_environment;
  END IF;
  INSERT INTO concurrency_slots (environment_id, slot)
  SELECT of_environment, g.slot FROM generate_series(1, layout_concurrency_slots.slot_limit) AS g (slot)
  ON CONFLICT DO NOTHING;
  -- A slot a dequeue is claiming meanwhile is waited for, and kept if it was taken.
  DELETE FROM concurrency_slots AS s
  WHERE s.environment_id = of_environment AND s.slot > layout_concurrency_slots.slot_limit AND s.run_id IS NULL;
  FOR high IN SELECT s.slot FROM concurrency_slots AS s
              WHERE s.environment_id = of_environment AND s.slot > layout_concurrency_slots.slot_limit
              ORDER BY s.slot
  LOOP
    -- Its run may be ending meanwhile (its release deletes the row): then there is nothing to move.
    SELECT s.run_id INTO unslotted FROM concurrency_slots AS s
    WHERE s.environment_id = of_environment AND s.slot = high.slot AND s.run_id IS NOT NULL FOR UPDATE;
    CONTINUE WHEN NOT FOUND;
    SELECT s.slot INTO low FROM concurrency_slots AS s
    WHERE s.environment_id = of_environment AND s.run_id IS NULL AND s.slot <= layout_concurrency_slots.slot_limit
    ORDER BY s.slot LIMIT 1 FOR UPDATE SKIP LOCKED;
    EXIT WHEN NOT FOUND;
    DELETE FROM concurrency_slots AS s WHERE s.environment_id = of_environment AND s.slot = high.slot;
    UPDATE concurrency_slots AS s SET run_id = unslotted WHERE s.environment_id = of_environment AND s.slot = low;
  END LOOP;
  -- A run changing status meanwhile is skipped: its own transition takes or gives back its slot.
  FOR unslotted IN SELECT r.id FROM runs AS r
                   WHERE r.environment_id = of_environment AND r.status IN ('DEQUEUED', 'EXECUTING')
                     AND NOT EXISTS (SELECT FROM concurrency_slots AS s WHERE s.run_id = r.id)
                   ORDER BY r.id FOR UPDATE SKIP LOCKED
  LOOP
    UPDATE concurrency_slots AS s SET run_id = unslotted
    WHERE s.environment_id = of_environment
      AND s.slot = (SELECT f.slot FROM concurrency_slots AS f
                    WHERE f.environment_id = of_environment AND f.run_id IS NULL
                      AND f.slot <= layout_concurrency_slots.slot_limit
                    ORDER BY f.slot LIMIT 1 FOR UPDATE SKIP LOCKED);
    IF NOT FOUND THEN
      INSERT INTO concurrency_slots (environment_id, slot, run_id)
      SELECT of_environment, greatest(coalesce(max(s.slot), 0), layout_concurrency_slots.slot_limit) + 1, unslotted
      FROM concurrency_slots AS s WHERE s.environment_id = of_environment;
    END IF;
  END LOOP;
END
$$;

-- A slot at or below the limit was just freed while runs still hold slots above a lowered limit:
-- the lowest of them moves into it, so the freed slot does not let a new run in past the limit.
CREATE OR REPLACE FUNCTION runops.settle_overflow_slot(of_environment text, freed integer)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  high record;
  lim integer := (SELECT l.slot_limit FROM concurrency_limits AS l WHERE l.environment_id = of_environment);
BEGIN
  IF freed > lim THEN
    -- an overflow slot goes with its holder
    DELETE FROM concurrency_slots AS s WHERE s.environment_id = of_environment AND s.slot = freed;
    RETURN;
  END IF;
  -- Waits for a holder whose own release is under way; a row it deleted is passed over.
  SELECT s.slot, s.run_id INTO high FROM concurrency_slots AS s
  WHERE s.environment_id = of_environment AND s.slot > lim AND s.run_id IS NOT NULL
  ORDER BY s.slot LIMIT 1 FOR UPDATE;
  IF FOUND THEN
    DELETE FROM concurrency_slots AS s WHERE s.environment_id = of_environment AND s.slot = high.slot;
    UPDATE concurrency_slots AS s SET run_id = high.run_id WHERE s.environment_id = of_environment AND s.slot = freed;
  END IF;
END
$$;

-- A run entering DEQUEUED/EXECUTING other than through dequeue_runs (an operator's UPDATE) takes
-- a free slot, or is refused (RO003): the limit holds for every writer.
CREATE OR REPLACE FUNCTION runops.take_concurrency_slot(of_environment text, of_run text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  lim integer;
BEGIN
  IF EXISTS (SELECT FROM concurrency_slots AS s WHERE s.run_id = of_run) THEN
    RETURN;
  END IF;
  SELECT l.slot_limit INTO lim FROM concurrency_limits AS l WHERE l.environment_id = of_environment;
  IF NOT FOUND THEN
    lim := coalesce((SELECT e.maximum_concurrency_limit FROM runtime_environments AS e WHERE e.id = of_environment), 0);
    PERFORM layout_concurrency_slots(of_environment, lim);
  END IF;
  UPDATE concurrency_slots AS s SET run_id = of_run
  WHERE s.environment_id = of_environment
    AND s.slot = (SELECT f.slot FROM concurrency_slots AS f
                  WHERE f.environment_id = of_environment AND f.run_id IS NULL AND f.slot <= lim
                  ORDER BY f.slot LIMIT 1 FOR UPDATE SKIP LOCKED);
  IF NOT FOUND THEN
    PERFORM raise_error('RO003', format('run_%s cannot be leased: environment %s is at its concurrency limit (%s)',
                                        of_run, of_environment, lim),
                        NULL, 'wait for a leased run to finish, or raise maximum_concurrency_limit');
  END IF;
END
$$;

-- Up to `runs` workers waiting for work of this environment (and of one of these queues and
-- tasks, where they asked for some) are told so, once each: their registration goes and their
-- channel is notified (committed with the new work). Registrations another transaction is
-- taking are passed over.
CREATE OR REPLACE FUNCTION runops.wake_waiting_workers(of_environment text, queues text[], tasks text[],
                                                       runs integer)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  channel text;
BEGIN
  FOR channel IN
    -- ARRAY(...): the chosen registrations are read once, whatever the plan (an IN (subquery)
    -- read again per row would skip the ones this DELETE removed and take the next ones).
    DELETE FROM waiting_workers AS w
    WHERE w.channel = ANY (ARRAY(SELECT x.channel FROM waiting_workers AS x
                                 WHERE x.environment_id = of_environment AND x.expires_at > pg_catalog.now()
                                   AND (x.queues IS NULL OR x.queues && wake_waiting_workers.queues)
                                   AND (x.tasks IS NULL OR x.tasks && wake_waiting_workers.tasks)
                                 LIMIT runs FOR UPDATE SKIP LOCKED))
    RETURNING w.channel
  LOOP
    PERFORM pg_notify(channel, of_environment);
  END LOOP;
END
$$;

-- New PENDING runs (a trigger, a batch: every INSERT statement into runs) wake waiting workers of
-- their environments. One call per statement; while no worker waits anywhere in this store it
-- reads no more than the empty registry (about 1 µs a trigger), and while workers wait only in
-- other environments, one probe per environment of the new runs.
CREATE OR REPLACE FUNCTION runops.wake_for_new_runs()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  -- Cheapest first: anyone waiting at all, then anyone waiting in these runs' environments.
  IF EXISTS (SELECT FROM waiting_workers)
     AND EXISTS (SELECT FROM added AS a JOIN waiting_workers AS w ON w.environment_id = a.environment_id
                 WHERE a.status = 'PENDING') THEN
    PERFORM wake_waiting_workers(n.environment_id, n.queues, n.tasks, n.runs)
    FROM (SELECT a.environment_id, array_agg(DISTINCT a.queue) AS queues,
                 array_agg(DISTINCT a.task_identifier) AS tasks, count(*)::integer AS runs
          FROM added AS a WHERE a.status = 'PENDING' GROUP BY a.environment_id) AS n;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER runs_wake_workers
  AFTER INSERT ON runops.runs
  REFERENCING NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION runops.wake_for_new_runs();

-- A run turned final: close its open attempt, and complete every local edge waiting on it
-- (its RUN waitpoint), resuming runs that were waiting only on it.
CREATE OR REPLACE FUNCTION runops.after_run_final()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  UPDATE attempts AS a
  SET status = CASE NEW.status WHEN 'COMPLETED_SUCCESSFULLY' THEN 'COMPLETED'
                               WHEN 'CANCELED' THEN 'CANCELED' ELSE 'FAILED' END,
      output = coalesce(a.output, NEW.output),
      error = coalesce(a.error, NEW.error),
      completed_at = coalesce(a.completed_at, now())
  WHERE a.run_id = NEW.id AND a.status IN ('EXECUTING', 'PAUSED');
  PERFORM resume_local_waiters(NEW.id);
  PERFORM batch_item_finished(NEW.id);
  RETURN NULL;
END
$$;

-- The two triggers behind the state machine: every status change passes the guard; a run turned
-- final completes what waits on it (its RUN waitpoint) in the same transaction.
CREATE OR REPLACE TRIGGER runs_status_guard
  BEFORE UPDATE OF status ON runops.runs
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
  EXECUTE FUNCTION runops.guard_run_status();

CREATE OR REPLACE TRIGGER runs_after_final
  AFTER UPDATE OF status ON runops.runs
  FOR EACH ROW
  WHEN (runops.is_final_status(NEW.status) AND NOT runops.is_final_status(OLD.status))
  EXECUTE FUNCTION runops.after_run_final();

-- The one row-level entry to a per-run write: RO006/RO001 for a bad id, RO002 for another
-- store's run, RO004 when it is missing or (environment_id given) of another environment.
-- Locks the run.
CREATE OR REPLACE FUNCTION runops.lock_run(run_id text, environment_id text)
RETURNS runops.runs
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  bare text := require_local_id(run_id, 'run', 'run_id');
  r runs;
BEGIN
  SELECT * INTO r FROM runs AS x WHERE x.id = bare FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('run %s not found', run_id));
  END IF;
  PERFORM require_row_environment(r.environment_id, lock_run.environment_id, 'run', run_id);
  RETURN r;
END
$$;

CREATE OR REPLACE FUNCTION runops.require_worker(worker_id text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF worker_id IS NULL OR worker_id = '' OR length(worker_id) > 256 OR octet_length(worker_id) > 1024 THEN
    PERFORM raise_error('RO006', 'worker_id must be 1 to 256 characters (at most 1024 bytes)');
  END IF;
  RETURN worker_id;
END
$$;

-- The opening of a worker's call on its leased run: RO006 for a bad worker id, lock_run's
-- refusals, then RO003 unless the run is in a status the call accepts — DEQUEUED to start an
-- attempt (a final run gets no more), DEQUEUED or EXECUTING otherwise — and leased to this
-- worker. Returns the run, locked.
CREATE OR REPLACE FUNCTION runops.lock_leased_run(run_id text, worker_id text, environment_id text, what text,
                                                  starting boolean)
RETURNS runops.runs
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  worker text := require_worker(worker_id);
  r runs := lock_run(run_id, environment_id);
BEGIN
  IF starting THEN
    IF is_final_status(r.status) THEN
      PERFORM raise_error('RO003', format('run_%s is %s: a final run gets no more attempts', r.id, r.status));
    END IF;
    IF r.status <> 'DEQUEUED' THEN
      PERFORM raise_error('RO003', format('%s needs a dequeued run; run_%s is %s', what, r.id, r.status),
                          NULL, 'dequeue it with dequeue_runs first');
    END IF;
  ELSIF r.status NOT IN ('DEQUEUED', 'EXECUTING') THEN
    PERFORM raise_error('RO003', format('%s needs a dequeued or executing run; run_%s is %s', what, r.id, r.status));
  END IF;
  IF r.locked_by IS DISTINCT FROM worker THEN
    PERFORM raise_error('RO003', format('run_%s is leased to worker %s, not %s', r.id,
                                        coalesce(input_prefix(r.locked_by), '(none)'), input_prefix(worker)),
                        NULL, 'dequeue the run again; its lease may have lapsed');
  END IF;
  RETURN r;
END
$$;

-- The attempt a worker reports on: RO003 for a stale attempt or a run no longer executing.
CREATE OR REPLACE FUNCTION runops.require_current_attempt(r runops.runs, attempt_number integer, what text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF r.status <> 'EXECUTING' THEN
    PERFORM raise_error('RO003', format('%s needs an executing run; run_%s is %s', what, r.id, r.status),
                        NULL, CASE WHEN r.status = 'CANCELED' THEN 'the run was canceled: stop working on it' END);
  END IF;
  IF r.attempt_number <> attempt_number THEN
    PERFORM raise_error('RO003', format('attempt %s of run_%s is stale: the current attempt is %s',
                                        attempt_number, r.id, r.attempt_number));
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION runops.dequeue_runs(environment_id text, worker_id text, max_runs integer,
                                               options jsonb DEFAULT '{}')
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  worker text := require_worker(dequeue_runs.worker_id);
  lease_for interval;
  queues text[];
  tasks text[];
  env environment_context;
  lim integer;
  ts timestamptz := now();
  candidates text[];
  slots integer[];
  picked text[];
  numbers integer[];
  wake text := option_text(o, 'wake', 63);
  starting boolean := coalesce(option_boolean(o, 'start'), false);
BEGIN
  PERFORM reject_unknown_options(o, ARRAY['lease', 'queues', 'start', 'tasks', 'wake'], 'dequeue');
  IF wake !~ '^[a-z_][a-z0-9_]*$' THEN
    PERFORM raise_invalid('option wake', 'a channel name of lower-case letters, digits and underscores',
                          quote_literal(input_prefix(wake)));
  END IF;
  PERFORM require_between(max_runs, 1, 1000, 'max_runs');
  lease_for := option_duration(o, 'lease', default_lease());
  IF lease_for < interval '1 second' THEN
    PERFORM raise_error('RO006', 'option lease must be at least 1s');
  END IF;
  queues := option_text_array(o, 'queues');
  tasks := option_text_array(o, 'tasks');
  env := load_environment(dequeue_runs.environment_id);
  IF env.id IS NULL THEN
    PERFORM raise_error('RO004', format('environment %s not found',
                                        quote_nullable(input_prefix(dequeue_runs.environment_id))));
  END IF;
  IF env.paused OR env.archived OR env.project_deleted THEN
    RETURN;  -- a paused environment hands out no work; attempts in flight still complete
  END IF;
  -- The environment's slots follow its limit: laid out on its first dequeue here, and again
  -- after the limit changed (sql/schema/45_concurrency_slots.sql); a layout in flight holds
  -- only the rows it changes.
  lim := env.maximum_concurrency_limit;
  IF NOT EXISTS (SELECT FROM concurrency_limits AS l WHERE l.environment_id = env.id AND l.slot_limit = lim) THEN
    PERFORM layout_concurrency_slots(env.id, lim);
  END IF;
  -- Every slot taken: no run is locked for nothing.
  IF NOT EXISTS (SELECT FROM concurrency_slots AS s
                 WHERE s.environment_id = env.id AND s.run_id IS NULL AND s.slot <= lim) THEN
    RETURN;
  END IF;
  SELECT array_agg(c.id ORDER BY c.queued_at, c.id) INTO candidates FROM (
    SELECT r.id, r.queued_at FROM runs AS r
    WHERE r.environment_id = env.id AND r.status = 'PENDING'
      AND (queues IS NULL OR r.queue = ANY (queues))
      AND (tasks IS NULL OR r.task_identifier = ANY (tasks))
    ORDER BY r.queued_at, r.id
    LIMIT max_runs
    FOR UPDATE SKIP LOCKED) AS c;
  -- A worker that found the queue dry waits for new work: the next run to become PENDING here
  -- notifies its channel (sql/schema/46_waiting_workers.sql). One that got all it asked for is
  -- busy, and waits for nothing. A registration lives in real time (pg_catalog.now(), not the
  -- test clock): it is a process's liveness, which the test clock does not move.
  IF wake IS NOT NULL THEN
    IF coalesce(cardinality(candidates), 0) < max_runs THEN
      INSERT INTO waiting_workers AS w (channel, environment_id, queues, tasks, expires_at)
      VALUES (wake, env.id, queues, tasks, pg_catalog.now() + interval '30 seconds')
      ON CONFLICT (channel) DO UPDATE
      SET environment_id = excluded.environment_id, queues = excluded.queues, tasks = excluded.tasks,
          expires_at = excluded.expires_at;
    ELSE
      DELETE FROM waiting_workers AS w WHERE w.channel = wake;
    END IF;
  END IF;
  IF candidates IS NULL THEN
    RETURN;
  END IF;
  -- Free slots, skipping those another dequeuer is taking: the first candidates in queue order
  -- get them, the rest stay PENDING for the next call. The slots are written by their keys
  -- (= ANY): a join with the locking query planned generically (LIMIT unknown) scanned the table.
  SELECT array_agg(f.slot ORDER BY f.slot) INTO slots FROM (
    SELECT s.slot FROM concurrency_slots AS s
    WHERE s.environment_id = env.id AND s.run_id IS NULL AND s.slot <= lim
    ORDER BY s.slot LIMIT cardinality(candidates)
    FOR UPDATE SKIP LOCKED) AS f;
  IF slots IS NULL THEN
    RETURN;
  END IF;
  picked := candidates[1:cardinality(slots)];
  UPDATE concurrency_slots AS s SET run_id = picked[array_position(slots, s.slot)]
  WHERE s.environment_id = env.id AND s.slot = ANY (slots);
  PERFORM set_mover('dequeue_runs');
  -- start: each run's attempt opens in this transaction, and the run goes PENDING -> EXECUTING in
  -- one write, as start_attempt would have moved it: the worker's start_attempt call, its
  -- transaction and a second rewrite of the run row are saved. A run out of attempts is handed
  -- out DEQUEUED: the worker's start_attempt crashes it.
  IF starting THEN
    SELECT array_agg(r.id), array_agg(open_attempt(r, worker, ts)) INTO picked, numbers
    FROM runs AS r WHERE r.id = ANY (picked);
  END IF;
  PERFORM hand_to_worker(picked, numbers, worker, lease_for, ts);
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = ANY (picked) ORDER BY v.queued_at, v.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.heartbeat_run(run_id text, worker_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs := lock_leased_run(heartbeat_run.run_id, heartbeat_run.worker_id, heartbeat_run.environment_id,
                            'heartbeat_run', false);
BEGIN
  UPDATE runs AS x SET lease_expires_at = now() + coalesce(x.lease, default_lease()), updated_at = now()
  WHERE x.id = r.id;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

-- Which attempt a start opens (the one rule: start_attempt, and dequeue_runs' start option): a
-- run resumed from a checkpoint continues the attempt that paused; otherwise the next one, numbered
-- from 1, is written — or none, and NULL is returned, once the run has used all its attempts
-- (least(max_attempts, 250)): its start crashes it. The attempt row is written here; the run's
-- own row by hand_to_worker.
CREATE OR REPLACE FUNCTION runops.open_attempt(r runops.runs, worker text, ts timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  n integer;
BEGIN
  UPDATE attempts AS a SET status = 'EXECUTING', worker_id = worker
  WHERE a.id = (SELECT p.id FROM attempts AS p WHERE p.run_id = r.id AND p.status = 'PAUSED'
                ORDER BY p.number DESC LIMIT 1)
  RETURNING a.number INTO n;
  IF FOUND THEN
    RETURN n;
  END IF;
  n := r.attempt_number + 1;
  IF n > least(r.max_attempts, 250) THEN
    RETURN NULL;
  END IF;
  INSERT INTO attempts (id, run_id, environment_id, number, status, worker_id, started_at)
  VALUES (mint_id(), r.id, r.environment_id, n, 'EXECUTING', worker, ts);
  RETURN n;
END
$$;

-- The one write that hands runs to a worker: each run is leased to it (DEQUEUED) or, where an
-- attempt number is given (open_attempt's), also started (EXECUTING) — by dequeue_runs (both in
-- one write with its start option) and start_attempt. lease_for NULL keeps each run's lease. One
-- UPDATE per call, whatever the number of runs: each run row is rewritten once per transaction.
CREATE OR REPLACE FUNCTION runops.hand_to_worker(ids text[], attempt_numbers integer[], worker text,
                                                 lease_for interval, ts timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  UPDATE runs AS r
  SET status = CASE WHEN m.n IS NULL THEN 'DEQUEUED' ELSE 'EXECUTING' END,
      locked_by = worker, lease = coalesce(lease_for, r.lease),
      lease_expires_at = ts + coalesce(lease_for, r.lease, default_lease()),
      started_at = coalesce(r.started_at, ts), ttl_expires_at = NULL,
      attempt_number = coalesce(m.n, r.attempt_number),
      execution_deadline = CASE WHEN m.n IS NULL THEN r.execution_deadline ELSE ts + r.max_duration END,
      retry_at = CASE WHEN m.n IS NULL THEN r.retry_at END,
      updated_at = ts
  FROM unnest(ids, attempt_numbers) AS m (id, n)
  WHERE r.id = m.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.start_attempt(run_id text, worker_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs := lock_leased_run(start_attempt.run_id, start_attempt.worker_id, start_attempt.environment_id,
                            'start_attempt', true);
  ts timestamptz := now();
  n integer;
BEGIN
  PERFORM set_mover('start_attempt');
  n := open_attempt(r, start_attempt.worker_id, ts);
  IF n IS NULL THEN
    UPDATE runs AS x
    SET status = 'CRASHED', completed_at = ts, locked_by = NULL, lease_expires_at = NULL, updated_at = ts,
        error = jsonb_build_object('message', format('run crashed: all %s attempts were used', r.max_attempts),
                                   'status', 'CRASHED')
    WHERE x.id = r.id;
  ELSE
    PERFORM hand_to_worker(ARRAY[r.id], ARRAY[n], start_attempt.worker_id, NULL, ts);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.complete_attempt(run_id text, attempt_number integer, output jsonb,
                                                   environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(complete_attempt.attempt_number, 1, 250, 'attempt_number');
  r runs;
BEGIN
  PERFORM check_json_bounds(complete_attempt.output, 'output');
  r := lock_run(complete_attempt.run_id, complete_attempt.environment_id);
  -- The same attempt's completion, repeated (a retried network call), returns the row as it is.
  IF r.status = 'COMPLETED_SUCCESSFULLY' AND r.attempt_number = n THEN
    RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
    RETURN;
  END IF;
  PERFORM require_current_attempt(r, n, 'complete_attempt');
  PERFORM set_mover('complete_attempt');
  UPDATE runs AS x
  SET status = 'COMPLETED_SUCCESSFULLY', output = complete_attempt.output, completed_at = now(),
      locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = now()
  WHERE x.id = r.id;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.fail_attempt(run_id text, attempt_number integer, error jsonb,
                                               retry_at timestamptz DEFAULT NULL, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(fail_attempt.attempt_number, 1, 250, 'attempt_number');
  r runs;
  ts timestamptz := now();
  named text;
  final_status text;
BEGIN
  PERFORM check_json_bounds(fail_attempt.error, 'error');
  r := lock_run(fail_attempt.run_id, fail_attempt.environment_id);
  IF fail_attempt.error IS NOT NULL AND jsonb_typeof(fail_attempt.error) = 'object' THEN
    named := fail_attempt.error ->> 'status';
  END IF;
  -- A repeated report of the same failed attempt returns the row as it is.
  IF r.status <> 'EXECUTING' AND r.attempt_number = n
     AND EXISTS (SELECT FROM attempts AS a WHERE a.run_id = r.id AND a.number = n AND a.status = 'FAILED')
     AND (r.status = 'RETRYING_AFTER_FAILURE' OR is_final_status(r.status)) THEN
    RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
    RETURN;
  END IF;
  PERFORM require_current_attempt(r, n, 'fail_attempt');
  UPDATE attempts AS a SET status = 'FAILED', error = fail_attempt.error, completed_at = ts
  WHERE a.run_id = r.id AND a.number = n;
  PERFORM set_mover('fail_attempt');
  IF fail_attempt.retry_at IS NOT NULL AND n < least(r.max_attempts, 250) THEN
    UPDATE runs AS x
    SET status = 'RETRYING_AFTER_FAILURE', retry_at = fail_attempt.retry_at, error = fail_attempt.error,
        locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
    WHERE x.id = r.id;
  ELSE
    final_status := CASE WHEN named IN ('COMPLETED_WITH_ERRORS', 'CRASHED', 'SYSTEM_FAILURE', 'TIMED_OUT')
                         THEN named ELSE 'COMPLETED_WITH_ERRORS' END;
    UPDATE runs AS x
    SET status = final_status, error = fail_attempt.error, completed_at = ts, retry_at = NULL,
        locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
    WHERE x.id = r.id;
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_checkpoint(run_id text, attempt_number integer, reason text,
                                                    location text, metadata jsonb DEFAULT '{}',
                                                    environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(create_checkpoint.attempt_number, 1, 250, 'attempt_number');
  meta jsonb := require_object(create_checkpoint.metadata, 'metadata');
  r runs;
  ts timestamptz := now();
BEGIN
  IF reason IS NULL OR reason NOT IN ('MANUAL', 'WAIT_FOR_DURATION', 'WAIT_FOR_TASK', 'WAIT_FOR_BATCH',
                                      'RETRYING_AFTER_FAILURE') THEN
    PERFORM raise_invalid('checkpoint reason', 'MANUAL, WAIT_FOR_DURATION, WAIT_FOR_TASK, WAIT_FOR_BATCH or '
                          'RETRYING_AFTER_FAILURE', quote_nullable(input_prefix(reason)));
  END IF;
  IF location IS NULL OR location = '' OR length(location) > 2048 THEN
    PERFORM raise_error('RO006', 'checkpoint location must be 1 to 2048 characters');
  END IF;
  PERFORM check_json_bounds(meta, 'metadata');
  r := lock_run(create_checkpoint.run_id, create_checkpoint.environment_id);
  PERFORM require_current_attempt(r, n, 'create_checkpoint');
  INSERT INTO checkpoints (id, run_id, environment_id, attempt_number, reason, location, metadata, created_at)
  VALUES (mint_id(),
          r.id, r.environment_id, n, reason, location, meta, ts);
  UPDATE attempts AS a SET status = 'PAUSED' WHERE a.run_id = r.id AND a.number = n;
  PERFORM set_mover('create_checkpoint');
  UPDATE runs AS x
  SET status = 'WAITING_TO_RESUME', suspended_reason = reason, locked_by = NULL, lease_expires_at = NULL,
      execution_deadline = NULL, updated_at = ts
  WHERE x.id = r.id;
  -- Waiting for something that already happened must not wait at all.
  IF reason <> 'MANUAL' THEN
    BEGIN
      PERFORM refresh_blockers(r.id, true);
    EXCEPTION WHEN SQLSTATE 'RO009' THEN
      NULL;  -- the other store is down: its blockers are re-checked by tick
    END;
    PERFORM resume_if_unblocked(r.id, false);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

-- WAITING_TO_RESUME -> PENDING when no edge of the run is pending. A MANUAL checkpoint resumes
-- only when asked (allow_manual). True when nothing blocks the run any more.
CREATE OR REPLACE FUNCTION runops.resume_if_unblocked(run_id text, allow_manual boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  r runs;
  previous text;
BEGIN
  SELECT * INTO r FROM runs AS x WHERE x.id = resume_if_unblocked.run_id FOR UPDATE;
  IF NOT FOUND OR is_final_status(r.status)
     OR EXISTS (SELECT FROM run_waitpoints AS e WHERE e.run_id = r.id AND e.completed_at IS NULL) THEN
    RETURN false;
  END IF;
  IF r.status = 'WAITING_TO_RESUME' AND (allow_manual OR r.suspended_reason IS DISTINCT FROM 'MANUAL') THEN
    previous := set_mover('resume_run');
    UPDATE runs AS x SET status = 'PENDING', suspended_reason = NULL, updated_at = now() WHERE x.id = r.id;
    PERFORM set_mover(previous);
  END IF;
  RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION runops.resume_run(run_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs := lock_run(resume_run.run_id, resume_run.environment_id);
BEGIN
  -- Idempotent: the client sends it as a follow-up and tick may get there first.
  IF r.status = 'WAITING_TO_RESUME' THEN
    PERFORM refresh_blockers(r.id, true);
    PERFORM resume_if_unblocked(r.id, true);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.finalize_run(run_id text, status text, error jsonb DEFAULT NULL,
                                               output jsonb DEFAULT NULL, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs;
  final_status text := finalize_run.status;
  ts timestamptz := now();
BEGIN
  IF final_status IS NULL OR NOT is_final_status(final_status) THEN
    PERFORM raise_error('RO006', format('finalize_run needs a final status (CANCELED, INTERRUPTED, COMPLETED_SUCCESSFULLY, '
                                        'COMPLETED_WITH_ERRORS, SYSTEM_FAILURE, CRASHED, EXPIRED, TIMED_OUT), got %s',
                                        quote_nullable(input_prefix(final_status))));
  END IF;
  PERFORM check_json_bounds(finalize_run.error, 'error');
  PERFORM check_json_bounds(finalize_run.output, 'output');
  r := lock_run(finalize_run.run_id, finalize_run.environment_id);
  -- Repeating the call that made the run final returns it unchanged.
  IF r.status = final_status THEN
    RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
    RETURN;
  END IF;
  PERFORM set_mover('finalize_run');
  -- One write: status, error and output land together, so no reader sees a final run without them.
  UPDATE runs AS x
  SET status = final_status,
      error = coalesce(finalize_run.error, x.error),
      output = coalesce(finalize_run.output, x.output),
      completed_at = ts,
      expired_at = CASE WHEN final_status = 'EXPIRED' THEN ts ELSE x.expired_at END,
      locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
  WHERE x.id = r.id;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

-- Cancels the live runs of the trees under the given (bare) root ids; returns how many.
CREATE OR REPLACE FUNCTION runops.cancel_trees(root_ids text[], reason text)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  canceled integer;
BEGIN
  PERFORM set_mover('cancel_run');
  WITH RECURSIVE tree AS (
    SELECT r.id FROM runs AS r WHERE r.id = ANY (root_ids)
    UNION
    SELECT c.id FROM runs AS c JOIN tree AS t ON c.parent_run_id = t.id
  ), live AS (
    SELECT r.id FROM runs AS r JOIN tree AS t ON t.id = r.id
    WHERE NOT is_final_status(r.status)
    ORDER BY r.depth DESC, r.id   -- descendants first: see cancel_run
    FOR UPDATE OF r
  )
  UPDATE runs AS x
  SET status = 'CANCELED', completed_at = ts, locked_by = NULL, lease_expires_at = NULL,
      execution_deadline = NULL, updated_at = ts,
      error = jsonb_build_object('message', coalesce(reason, 'run was canceled'), 'status', 'CANCELED')
  FROM live AS l WHERE x.id = l.id AND NOT is_final_status(x.status);
  GET DIAGNOSTICS canceled = ROW_COUNT;
  RETURN canceled;
END
$$;

CREATE OR REPLACE FUNCTION runops.cancel_run(run_id text, reason text DEFAULT NULL, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text;
  r runs;
BEGIN
  IF length(reason) > 2048 THEN
    PERFORM raise_error('RO006', 'cancel reason must be at most 2048 characters');
  END IF;
  bare := require_local_id(cancel_run.run_id, 'run', 'run_id');
  -- Not locked here: cancel_trees locks the whole tree, descendants before ancestors, the order
  -- in which a finishing child locks itself and then its waiting parent.
  SELECT * INTO r FROM runs AS x WHERE x.id = bare;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('run %s not found', cancel_run.run_id));
  END IF;
  PERFORM require_row_environment(r.environment_id, cancel_run.environment_id, 'run', cancel_run.run_id);
  -- Canceling a final run changes nothing (and repeating a cancel returns the same row).
  IF NOT is_final_status(r.status) THEN
    PERFORM cancel_trees(ARRAY[r.id], reason);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.cancel_dev_session_runs(environment_id text, dev_session_id text)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  roots text[];
BEGIN
  IF dev_session_id IS NULL OR dev_session_id = '' THEN
    PERFORM raise_error('RO006', 'dev_session_id is required');
  END IF;
  SELECT array_agg(r.id ORDER BY r.id) INTO roots FROM runs AS r
  WHERE r.environment_id = cancel_dev_session_runs.environment_id
    AND r.dev_session_id = cancel_dev_session_runs.dev_session_id AND NOT is_final_status(r.status);
  IF roots IS NULL THEN
    RETURN 0;
  END IF;
  RETURN cancel_trees(roots, 'the dev session ended');
END
$$;

CREATE OR REPLACE FUNCTION runops.execute_tasks_waiting_for_deploy(environment_id text, task_identifiers text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
BEGIN
  IF task_identifiers IS NULL OR cardinality(task_identifiers) = 0 THEN
    PERFORM raise_error('RO006', 'task_identifiers must name at least one task');
  END IF;
  PERFORM set_mover('execute_tasks_waiting_for_deploy');
  WITH waiting AS (
    SELECT r.id FROM runs AS r
    WHERE r.environment_id = execute_tasks_waiting_for_deploy.environment_id
      AND r.task_identifier = ANY (task_identifiers)
      AND r.status IN ('WAITING_FOR_DEPLOY', 'PENDING_VERSION')
    ORDER BY r.id FOR UPDATE  -- a one-shot call: wait for a locked run rather than leave it behind
  )
  UPDATE runs AS r SET status = 'PENDING', queued_at = ts, ttl_expires_at = ts + r.ttl, updated_at = ts
  FROM waiting WHERE r.id = waiting.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;
