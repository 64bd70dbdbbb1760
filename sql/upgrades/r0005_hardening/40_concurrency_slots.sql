-- r0005, dequeue without a per-environment lock: the concurrency limit as slot rows
-- (sql/schema/45_concurrency_slots.sql says why), and the slots of the runs already leased.
--
-- Runs may not change status between the backfill and the new status guard (applied with the
-- functions, later in this upgrade's transaction): a run leased by the old dequeue_runs in
-- between would hold no slot. The upgrade runner already holds SHARE ROW EXCLUSIVE on runs
-- before any revision runs (runops.ops.schema, take_upgrade_locks), which keeps writers out
-- until the upgrade commits while readers go on, so this file takes no lock of its own.

CREATE TABLE runops.concurrency_limits (
  environment_id text COLLATE "C" PRIMARY KEY,
  slot_limit     integer NOT NULL CHECK (slot_limit >= 0)
);

CREATE TABLE runops.concurrency_slots (
  environment_id text COLLATE "C" NOT NULL,
  slot           integer NOT NULL CHECK (slot >= 1),
  run_id         text COLLATE "C",
  PRIMARY KEY (environment_id, slot)
);
CREATE UNIQUE INDEX concurrency_slots_run_idx ON runops.concurrency_slots (run_id) WHERE run_id IS NOT NULL;
CREATE INDEX concurrency_slots_free_idx ON runops.concurrency_slots (environment_id, slot) WHERE run_id IS NULL;
ALTER TABLE runops.concurrency_slots SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);
ALTER TABLE runops.concurrency_limits OWNER TO runops_owner;
ALTER TABLE runops.concurrency_slots OWNER TO runops_owner;

-- Every environment with leased runs here: its runs hold slots 1..k, free slots fill up to its
-- limit (the local tenant row: the control plane's own, or the run-ops mirror; an environment
-- missing from it keeps just its holders' slots until the next dequeue lays them out). Holders
-- beyond the limit keep slots above it (overflow), as after a lowered limit.
WITH leased AS (
  SELECT r.environment_id, r.id,
         row_number() OVER (PARTITION BY r.environment_id ORDER BY r.id) AS slot
  FROM runops.runs AS r WHERE r.status IN ('DEQUEUED', 'EXECUTING')
), envs AS (
  SELECT l.environment_id, count(*)::integer AS held,
         coalesce(max(e.maximum_concurrency_limit), count(*)::integer) AS slot_limit
  FROM leased AS l LEFT JOIN runops.runtime_environments AS e ON e.id = l.environment_id
  GROUP BY l.environment_id
), limits AS (
  INSERT INTO runops.concurrency_limits (environment_id, slot_limit)
  SELECT v.environment_id, v.slot_limit FROM envs AS v
)
INSERT INTO runops.concurrency_slots (environment_id, slot, run_id)
SELECT l.environment_id, l.slot, l.id FROM leased AS l
UNION ALL
SELECT v.environment_id, g.slot, NULL FROM envs AS v
CROSS JOIN LATERAL generate_series(v.held + 1, v.slot_limit) AS g (slot);
