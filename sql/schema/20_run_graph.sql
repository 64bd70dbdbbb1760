-- The run graph: identical in both stores, except that RESIDENCY_CHECK(col) is rendered per store
-- (a cuid shape on the control plane, a KSUID shape on run-ops), so a row can only ever be
-- written into the store its id's shape names — even by a careless SQL caller.
--
--   runs            one task run; status moves only through runops.transition_run()
--   batches         a group of runs triggered together; owns a BATCH waitpoint
--   batch_items     cached membership (index -> a run the batch did not create; it may live in
--                   either store). A run a batch created is a member through its own
--                   runs.batch_id/batch_index and has no batch_items row (SPEC §4 [1.2]).
--   waitpoints      things a run can wait on: RUN, BATCH (ids derived from their owner),
--                   DATETIME, MANUAL
--   run_waitpoints  edges "run is blocked by waitpoint"; they live with the blocked run
--   attempts        one row per execution attempt of a run, numbered from 1
--   checkpoints     snapshots taken when a run suspends
--   run_statuses        the status vocabulary as data: which statuses are final, which release
--                       their run's idempotency key (and the functions the hot paths inline)
--   status_transitions  the state machine as data: allowed from -> to, and who makes the move
--
-- Ids are stored bare (no friendly prefix) and compared byte-wise (COLLATE "C"), because KSUID
-- text sorts like its bytes only under byte order. Columns that point at tenant rows carry no
-- foreign key: on run-ops those rows are a mirror.

-- Every run status, once. Rules about statuses ask this table or the IMMUTABLE functions below,
-- which hold the same lists as constants because they sit in hot places a table read would slow
-- (the CHECK on runs.status, the after-final trigger's WHEN, dedup): PostgreSQL inlines them into
-- each plan. tests/test_vocabulary.py proves functions, table and the Python RunStatus agree.
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

-- The vocabulary's constants (see run_statuses). Plain IMMUTABLE SQL so that PostgreSQL inlines
-- them: a CHECK or trigger WHEN calling a function it cannot inline costs a call per row.
CREATE FUNCTION runops.is_run_status(status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN status IN ('DELAYED', 'PENDING', 'PENDING_VERSION', 'WAITING_FOR_DEPLOY', 'DEQUEUED', 'EXECUTING',
                  'WAITING_TO_RESUME', 'RETRYING_AFTER_FAILURE', 'PAUSED', 'CANCELED', 'INTERRUPTED',
                  'COMPLETED_SUCCESSFULLY', 'COMPLETED_WITH_ERRORS', 'SYSTEM_FAILURE', 'CRASHED', 'EXPIRED',
                  'TIMED_OUT');
ALTER FUNCTION runops.is_run_status(text) OWNER TO runops_owner;
CREATE FUNCTION runops.is_final_status(status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT status IN ('CANCELED', 'INTERRUPTED', 'COMPLETED_SUCCESSFULLY', 'COMPLETED_WITH_ERRORS',
                    'SYSTEM_FAILURE', 'CRASHED', 'EXPIRED', 'TIMED_OUT')
$$;
ALTER FUNCTION runops.is_final_status(text) OWNER TO runops_owner;
CREATE FUNCTION runops.status_releases_key(status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
RETURN status IN ('INTERRUPTED', 'COMPLETED_WITH_ERRORS', 'SYSTEM_FAILURE', 'CRASHED', 'TIMED_OUT', 'EXPIRED');
ALTER FUNCTION runops.status_releases_key(text) OWNER TO runops_owner;

CREATE TABLE runops.status_transitions (
  from_status text NOT NULL,   -- 'NEW' stands for "the row does not exist yet"
  to_status   text NOT NULL,
  made_by     text NOT NULL,   -- the function that makes this move
  PRIMARY KEY (from_status, to_status, made_by)
);

CREATE TABLE runops.runs (
  id                          text COLLATE "C" PRIMARY KEY CHECK (RESIDENCY_CHECK(id)),
  environment_id              text COLLATE "C" NOT NULL,
  project_id                  text COLLATE "C" NOT NULL,
  organization_id             text COLLATE "C" NOT NULL,
  task_identifier             text NOT NULL,
  status                      text NOT NULL CHECK (runops.is_run_status(status)),
  payload                     jsonb NOT NULL,
  output                      jsonb,
  error                       jsonb,
  metadata                    jsonb NOT NULL DEFAULT '{}',
  tags                        text[] NOT NULL DEFAULT '{}',
  queue                       text NOT NULL,
  concurrency_key             text,
  idempotency_key             text,                 -- the caller's raw key, for display
  idempotency_key_hash        text COLLATE "C",     -- the dedup key (sha256 of key and salt)
  idempotency_key_scope       text,
  idempotency_key_expires_at  timestamptz,
  parent_run_id               text COLLATE "C" REFERENCES runops.runs (id),
  parent_attempt_number       integer,
  root_run_id                 text COLLATE "C",
  depth                       integer NOT NULL DEFAULT 0,
  resume_parent_on_completion boolean NOT NULL DEFAULT false,
  batch_id                    text COLLATE "C",
  batch_index                 integer,
  attempt_number              integer NOT NULL DEFAULT 0,
  max_attempts                integer NOT NULL DEFAULT 3,
  delay_until                 timestamptz,
  ttl                         interval,
  max_duration                interval,
  dev_session_id              text,
  locked_by                   text,                 -- the worker holding the lease
  lease                       interval,             -- how long each heartbeat extends it
  lease_expires_at            timestamptz,
  retry_at                    timestamptz,
  ttl_expires_at              timestamptz,          -- queued_at + ttl while never locked
  execution_deadline          timestamptz,          -- attempt start + max_duration
  suspended_reason            text,                 -- the checkpoint reason while WAITING_TO_RESUME
  queued_at                   timestamptz,
  started_at                  timestamptz,
  completed_at                timestamptz,
  expired_at                  timestamptz,
  created_at                  timestamptz NOT NULL,
  updated_at                  timestamptz NOT NULL,
  -- A replay's original (bare; either store: a LEGACY run replays as NEW after the flip). Last,
  -- where an installed store's ALTER TABLE puts it.
  replayed_from_run_id        text
);
-- One key-holding run per (environment, task, dedup key); runs without a key stay out of it.
CREATE UNIQUE INDEX runs_idempotency_key_idx
  ON runops.runs (environment_id, task_identifier, idempotency_key_hash)
  WHERE idempotency_key_hash IS NOT NULL;
CREATE INDEX runs_environment_created_idx ON runops.runs (environment_id, created_at DESC, id DESC);
CREATE INDEX runs_parent_idx ON runops.runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
-- The worker's queue. Every index here costs each trigger (opened, its predicate checked), so
-- the partial ones are few and cover only small, transient sets:
--   runs_queue_idx   PENDING runs in queue order (dequeue)
--   runs_active_idx  leased runs (the concurrency count; tick scans it for lapsed leases and
--                    max_duration, which the concurrency limits keep small)
--   runs_timer_idx   runs a time-driven step will move: DELAYED at delay_until, retries at
--                    retry_at, TTL'd queued runs at ttl_expires_at
--   runs_waiting_idx suspended runs (tick's resume pass)
-- Rarer operations (dev-session cancel, deploy release) filter the environment's runs.
CREATE INDEX runs_queue_idx ON runops.runs (environment_id, queued_at, id) WHERE status = 'PENDING';
CREATE INDEX runs_active_idx ON runops.runs (environment_id, lease_expires_at)
  WHERE status IN ('DEQUEUED', 'EXECUTING');
CREATE FUNCTION runops.wake_at(status text, delay_until timestamptz, retry_at timestamptz,
                               ttl_expires_at timestamptz)
RETURNS timestamptz
LANGUAGE sql IMMUTABLE
RETURN CASE status WHEN 'DELAYED' THEN delay_until
                   WHEN 'RETRYING_AFTER_FAILURE' THEN retry_at
                   WHEN 'PENDING' THEN ttl_expires_at END;
ALTER FUNCTION runops.wake_at(text, timestamptz, timestamptz, timestamptz) OWNER TO runops_owner;
CREATE INDEX runs_timer_idx ON runops.runs (runops.wake_at(status, delay_until, retry_at, ttl_expires_at))
  WHERE status IN ('DELAYED', 'RETRYING_AFTER_FAILURE')
     OR (status = 'PENDING' AND ttl_expires_at IS NOT NULL);
CREATE INDEX runs_waiting_idx ON runops.runs (updated_at) WHERE status = 'WAITING_TO_RESUME';
-- Batch membership of the runs a batch created: (batch, index) -> run, in index order. Partial,
-- so a run outside any batch costs this index only its predicate check. Unique: one created run
-- per index (writers of a batch take its row lock, so this never fires in normal operation; it
-- guards the invariant the dropped foreign keys no longer do).
CREATE UNIQUE INDEX runs_batch_member_idx ON runops.runs (batch_id, batch_index) WHERE batch_id IS NOT NULL;

CREATE TABLE runops.batches (
  id                         text COLLATE "C" PRIMARY KEY CHECK (RESIDENCY_CHECK(id)),
  environment_id             text COLLATE "C" NOT NULL,
  status                     text NOT NULL CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'ABORTED')),
  expected_count             integer NOT NULL,
  parent_run_id              text COLLATE "C" REFERENCES runops.runs (id),
  resume_parent_on_completion boolean NOT NULL DEFAULT false,
  idempotency_key            text,
  idempotency_key_expires_at timestamptz,
  seal_timeout               interval NOT NULL,
  seal_deadline              timestamptz,          -- created_at + seal_timeout while open
  sealed_at                  timestamptz,
  item_count                 integer NOT NULL DEFAULT 0,
  final_count                integer NOT NULL DEFAULT 0,   -- items whose run is final
  output                     jsonb,                -- [{index, run_id, status}] once COMPLETED
  completed_at               timestamptz,
  created_at                 timestamptz NOT NULL,
  updated_at                 timestamptz NOT NULL,
  remote_items               integer NOT NULL DEFAULT 0   -- items whose (cached) run lives in the other store:
                                                          -- never in final_count, read when the batch may finish
);
CREATE INDEX batches_seal_idx ON runops.batches (seal_deadline) WHERE status = 'PENDING';
-- Sealed batches waiting on runs in the other store: tick reads them (finish_remote_batches).
CREATE INDEX batches_remote_idx ON runops.batches (updated_at) WHERE status = 'PROCESSING' AND remote_items > 0;
CREATE UNIQUE INDEX batches_idempotency_key_idx
  ON runops.batches (environment_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- runs.batch_id and batch_items.batch_id name a batch, with no foreign key (SPEC §5 [1.2]): the
-- functions are the only writers, and each creates or locks the batch row (FOR UPDATE) in the
-- transaction that writes its members; purge_runs deletes a batch only when nothing names it.
-- The keys' checks were a third of a batch's cost (docs/benchmarks.md, "Batches");
-- `runops doctor --deep` and tests/test_batch_integrity.py prove the invariants instead.

CREATE TABLE runops.batch_items (
  batch_id   text COLLATE "C" NOT NULL,
  item_index integer NOT NULL CHECK (item_index >= 0),
  run_id     text COLLATE "C" NOT NULL,   -- a cached item's run may live in the other store
  created_at timestamptz NOT NULL,
  PRIMARY KEY (batch_id, item_index)
);
-- A run turning final finds the batches it belongs to (several, through cached items).
CREATE INDEX batch_items_run_idx ON runops.batch_items (run_id);

CREATE TABLE runops.waitpoints (
  id                         text COLLATE "C" PRIMARY KEY CHECK (RESIDENCY_CHECK(id)),
  environment_id             text COLLATE "C" NOT NULL,
  type                       text NOT NULL CHECK (type IN ('RUN', 'DATETIME', 'MANUAL', 'BATCH')),
  status                     text NOT NULL CHECK (status IN ('PENDING', 'COMPLETED')),
  completed_by_run_id        text COLLATE "C",
  completed_by_batch_id      text COLLATE "C",
  output                     jsonb,
  output_is_error            boolean NOT NULL DEFAULT false,
  completed_after            timestamptz,
  timeout_at                 timestamptz,
  idempotency_key            text,
  idempotency_key_expires_at timestamptz,
  tags                       text[] NOT NULL DEFAULT '{}',
  completed_at               timestamptz,
  created_at                 timestamptz NOT NULL
);
CREATE UNIQUE INDEX waitpoints_idempotency_key_idx
  ON runops.waitpoints (environment_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX waitpoints_due_idx ON runops.waitpoints (completed_after)
  WHERE status = 'PENDING' AND type = 'DATETIME';
CREATE INDEX waitpoints_timeout_idx ON runops.waitpoints (timeout_at)
  WHERE status = 'PENDING' AND timeout_at IS NOT NULL;

CREATE TABLE runops.run_waitpoints (
  run_id        text COLLATE "C" NOT NULL REFERENCES runops.runs (id),
  waitpoint_id  text COLLATE "C" NOT NULL,   -- may live in the other store
  environment_id text COLLATE "C" NOT NULL,
  completed_at  timestamptz,
  created_at    timestamptz NOT NULL,
  PRIMARY KEY (run_id, waitpoint_id)
);
CREATE INDEX run_waitpoints_waitpoint_idx ON runops.run_waitpoints (waitpoint_id);
CREATE INDEX run_waitpoints_pending_idx ON runops.run_waitpoints (run_id) WHERE completed_at IS NULL;

CREATE TABLE runops.attempts (
  id             text COLLATE "C" PRIMARY KEY CHECK (RESIDENCY_CHECK(id)),
  run_id         text COLLATE "C" NOT NULL REFERENCES runops.runs (id),
  environment_id text COLLATE "C" NOT NULL,
  number         integer NOT NULL CHECK (number >= 1),
  status         text NOT NULL CHECK (status IN ('EXECUTING', 'PAUSED', 'COMPLETED', 'FAILED', 'CANCELED')),
  worker_id      text,
  output         jsonb,
  error          jsonb,
  started_at     timestamptz NOT NULL,
  completed_at   timestamptz,
  UNIQUE (run_id, number)
);

CREATE TABLE runops.checkpoints (
  id             text COLLATE "C" PRIMARY KEY CHECK (RESIDENCY_CHECK(id)),
  run_id         text COLLATE "C" NOT NULL REFERENCES runops.runs (id),
  environment_id text COLLATE "C" NOT NULL,
  attempt_number integer NOT NULL,
  reason         text NOT NULL CHECK (reason IN ('MANUAL', 'WAIT_FOR_DURATION', 'WAIT_FOR_TASK',
                                                 'WAIT_FOR_BATCH', 'RETRYING_AFTER_FAILURE')),
  location       text NOT NULL,
  metadata       jsonb NOT NULL DEFAULT '{}',
  created_at     timestamptz NOT NULL
);

ALTER TABLE runops.status_transitions OWNER TO runops_owner;
ALTER TABLE runops.runs OWNER TO runops_owner;
ALTER TABLE runops.batches OWNER TO runops_owner;
ALTER TABLE runops.batch_items OWNER TO runops_owner;
ALTER TABLE runops.waitpoints OWNER TO runops_owner;
ALTER TABLE runops.run_waitpoints OWNER TO runops_owner;
ALTER TABLE runops.attempts OWNER TO runops_owner;
ALTER TABLE runops.checkpoints OWNER TO runops_owner;
-- The other store's FDW login reads exactly the tables it imports (sql/fdw/wire_peer.sql);
-- attempts and checkpoints never cross (docs/security.md).
GRANT SELECT ON runops.runs, runops.batches, runops.batch_items, runops.waitpoints,
                runops.run_waitpoints
  TO runops_fdw;

-- The moves between statuses (runops.run_statuses says what each status means).
INSERT INTO runops.status_transitions (from_status, to_status, made_by) VALUES
  ('NEW', 'PENDING', 'trigger_run'),
  ('NEW', 'DELAYED', 'trigger_run'),
  ('NEW', 'WAITING_FOR_DEPLOY', 'trigger_run'),
  ('NEW', 'PENDING_VERSION', 'trigger_run'),
  ('NEW', 'SYSTEM_FAILURE', 'trigger_failed_task'),
  ('DELAYED', 'PENDING', 'enqueue_delayed_runs'),
  ('WAITING_FOR_DEPLOY', 'PENDING', 'execute_tasks_waiting_for_deploy'),
  ('PENDING_VERSION', 'PENDING', 'execute_tasks_waiting_for_deploy'),
  ('PENDING', 'DEQUEUED', 'dequeue_runs'),
  ('PENDING', 'EXECUTING', 'dequeue_runs'),          -- its start option: start_attempt's move folded in
  ('DEQUEUED', 'EXECUTING', 'start_attempt'),
  ('DEQUEUED', 'CRASHED', 'start_attempt'),          -- no attempts left
  ('DEQUEUED', 'PENDING', 'release_lapsed_leases'),
  ('EXECUTING', 'PENDING', 'release_lapsed_leases'),
  ('EXECUTING', 'COMPLETED_SUCCESSFULLY', 'complete_attempt'),
  ('EXECUTING', 'RETRYING_AFTER_FAILURE', 'fail_attempt'),
  ('RETRYING_AFTER_FAILURE', 'PENDING', 'requeue_retries'),
  ('EXECUTING', 'COMPLETED_WITH_ERRORS', 'fail_attempt'),
  ('EXECUTING', 'CRASHED', 'fail_attempt'),
  ('EXECUTING', 'SYSTEM_FAILURE', 'fail_attempt'),
  ('EXECUTING', 'TIMED_OUT', 'fail_attempt'),
  ('EXECUTING', 'TIMED_OUT', 'enforce_max_duration'),
  ('EXECUTING', 'WAITING_TO_RESUME', 'create_checkpoint'),
  ('WAITING_TO_RESUME', 'PENDING', 'resume_run'),
  ('PENDING', 'EXPIRED', 'expire_enqueued_runs');
-- Any live status to any final one by finalize_run, and to CANCELED by cancel_run.
INSERT INTO runops.status_transitions (from_status, to_status, made_by)
SELECT live.status, final.status, mover
FROM runops.run_statuses AS live, runops.run_statuses AS final,
     unnest(ARRAY['finalize_run', 'cancel_run']) AS mover
WHERE NOT live.is_final AND final.is_final AND (mover = 'finalize_run' OR final.status = 'CANCELED');
