-- The environment's concurrency limit as rows, per store (SPEC §4: exact within a store).
--
--   concurrency_limits  one row per environment that has dequeued here: the limit its slots
--                       were laid out for (a change of maximum_concurrency_limit is seen by the
--                       next dequeue_runs, which lays them out again)
--   concurrency_slots   slot_limit rows per environment, numbered from 1; a slot is free (run_id
--                       NULL) or names the DEQUEUED/EXECUTING run holding it. After the limit is
--                       lowered below the runs holding slots, the excess holders keep slots above
--                       it (overflow) until they finish; a slot at or below the limit freed
--                       meanwhile goes to an overflow holder instead of a new run.
--
-- Why rows and not a count: dequeuers of one environment claim free slots with FOR UPDATE SKIP
-- LOCKED, so they never wait for each other, and nothing counts the environment's runs per call
-- (a per-environment lock held through commit serialised every dequeuer). The status guard
-- (runops.guard_run_status) is the one place a run takes or gives back its slot, so every
-- transition into or out of DEQUEUED/EXECUTING — dequeue, lease lapse, cancel, finalize,
-- completion, retry, checkpoint — keeps the rows exact, in the same transaction.
--
-- No foreign key to runs: a run holding a slot is live (purge deletes only final runs), the
-- guard frees the slot in the transaction that ends the run, and tick frees any slot whose run
-- is no longer DEQUEUED/EXECUTING (left by a write that bypassed the triggers).
CREATE TABLE runops.concurrency_limits (
  environment_id text COLLATE "C" PRIMARY KEY,
  slot_limit     integer NOT NULL CHECK (slot_limit >= 0)
);

CREATE TABLE runops.concurrency_slots (
  environment_id text COLLATE "C" NOT NULL,
  slot           integer NOT NULL CHECK (slot >= 1),
  run_id         text COLLATE "C",      -- the holder, bare; NULL: free
  PRIMARY KEY (environment_id, slot)
);
-- A run holds at most one slot; the guard finds it by the run.
CREATE UNIQUE INDEX concurrency_slots_run_idx ON runops.concurrency_slots (run_id) WHERE run_id IS NOT NULL;
-- Free slots, lowest first: what dequeue_runs claims.
CREATE INDEX concurrency_slots_free_idx ON runops.concurrency_slots (environment_id, slot) WHERE run_id IS NULL;
-- Every dequeue and every run's end rewrites a slot row: vacuum it often.
ALTER TABLE runops.concurrency_slots SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

ALTER TABLE runops.concurrency_limits OWNER TO runops_owner;
ALTER TABLE runops.concurrency_slots OWNER TO runops_owner;
