-- r0005, notifications (SPEC §4 Notifications [1.3]): `notifications: 'all'` for intermediate
-- statuses (a column of its own: sql/schema/10_tenants.sql says why), and the registry of
-- workers waiting for new work (sql/schema/46_waiting_workers.sql).
--
-- The tenant tables are published to the run-ops mirror. ADD COLUMN with a constant default
-- rewrites nothing; whichever store is upgraded first, replication goes on: a subscriber may
-- have a column the publisher lacks, and a row with the new column waits (the apply worker
-- retries) until the run-ops store has it too — `runops migrate` upgrades it right after the
-- control plane.
-- lock: runops.runtime_environments
ALTER TABLE runops.runtime_environments
  ADD COLUMN notify_every_status boolean NOT NULL DEFAULT false,
  ADD CONSTRAINT runtime_environments_notifications_check CHECK (notifications OR NOT notify_every_status);

CREATE UNLOGGED TABLE runops.waiting_workers (
  channel        text COLLATE "C" PRIMARY KEY,
  environment_id text COLLATE "C" NOT NULL,
  queues         text[],
  tasks          text[],
  expires_at     timestamptz NOT NULL
);
CREATE INDEX waiting_workers_environment_idx ON runops.waiting_workers (environment_id);
ALTER TABLE runops.waiting_workers OWNER TO runops_owner;

-- An unwired store's stand-in for the control plane's table (sql/fdw/10_unwired_peer.sql) lists
-- the columns it had when it was made: it gains the new one. A wired store's foreign table is
-- re-imported by `runops migrate`.
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_views AS v
             WHERE v.schemaname = 'runops_peer' AND v.viewname = 'runtime_environments') THEN
    CREATE OR REPLACE VIEW runops_peer.runtime_environments AS
      SELECT * FROM runops.runtime_environments WHERE false;
  END IF;
END
$$;
