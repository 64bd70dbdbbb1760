-- r0003, the mirror freshness bound (SPEC §4 [1.2]): the heartbeats table and the bound.
--
-- ADD COLUMN needs store_config's ACCESS EXCLUSIVE lock, and every call reads store_config: as in
-- r0002, the lock is waited for 200 ms at a time and the attempt retried, so the upgrade never
-- queues every caller behind it for long. The locks of 10_vocabulary.sql are taken here too, in
-- the same statement (all or none): runs for its CHECK, and the views it replaces (a view's lock
-- reaches the tables it reads). Taking them one file at a time would hold store_config while
-- waiting for runs, which a trigger holding runs and reading store_config never lets go.
DO $$
DECLARE
  previous text := current_setting('lock_timeout');
  attempts integer := 0;
BEGIN
  LOOP
    BEGIN
      PERFORM set_config('lock_timeout', '200ms', true);
      LOCK TABLE runops.store_config, runops.runs, runops.run_view, runops.waitpoint_view IN ACCESS EXCLUSIVE MODE;
      PERFORM set_config('lock_timeout', previous, true);
      RETURN;
    EXCEPTION WHEN lock_not_available THEN
      attempts := attempts + 1;
      IF attempts >= 600 THEN
        RAISE EXCEPTION 'r0003 could not lock runops.store_config and runops.runs in %s attempts: too busy to upgrade now', attempts;
      END IF;
      PERFORM pg_sleep(0.01 + random() * 0.04);
    END;
  END LOOP;
END
$$;

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
