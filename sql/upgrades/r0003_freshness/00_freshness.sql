-- r0003, the mirror freshness bound (SPEC §4 [1.2]): the heartbeats table and the bound.
--
-- ADD COLUMN needs store_config's ACCESS EXCLUSIVE lock, and every call reads store_config: as in
-- r0002, the lock is waited for 200 ms at a time and the attempt retried, so the upgrade never
-- queues every caller behind it for long. The locks of 10_vocabulary.sql are named here too, to
-- be taken in the same statement (all or none): runs for its CHECK, and the views it replaces (a
-- view's lock reaches the tables it reads). Taking them one file at a time would hold
-- store_config while waiting for runs, which a trigger holding runs and reading store_config
-- never lets go.
--
-- Released with the lock-with-retry block written out here; since the switch to frozen deltas
-- the upgrade takes the tables named below (and those of every other pending revision) in one
-- such block before any revision runs: runops.ops.schema.take_upgrade_locks, its one home.
-- lock: runops.store_config, runops.runs, runops.run_view, runops.waitpoint_view

ALTER TABLE runops.store_config
  ADD COLUMN mirror_freshness_seconds integer NOT NULL DEFAULT 60 CHECK (mirror_freshness_seconds BETWEEN 1 AND 86400);

CREATE TABLE runops.heartbeats (
  source  text COLLATE "C" PRIMARY KEY CHECK (source IN ('control_plane_tick', 'run_ops_tick', 'mirror_pull')),
  beat_at timestamptz
);
ALTER TABLE runops.heartbeats OWNER TO runops_owner;
INSERT INTO runops.heartbeats (source) VALUES ('control_plane_tick'), ('run_ops_tick'), ('mirror_pull');

-- The FDW login reads exactly the tables the other store imports (docs/security.md): attempts
-- and checkpoints never cross.
REVOKE SELECT ON runops.attempts, runops.checkpoints FROM runops_fdw;
