-- Heartbeats: when time-driven work last ran, and how fresh the tenant mirror is.
--
--   control_plane_tick  the control plane's tick() sets it. The row is published with the tenant
--                       tables, so on the run-ops store it says up to when replication has
--                       delivered the control plane's state: the mirror's heartbeat.
--   run_ops_tick        the run-ops store's tick() sets it (its own, never replicated).
--   mirror_pull         the run-ops store's pull of the tenant tables through the FDW sets it.
--
-- A NULL beat_at: never. The mirror's age is now() minus the newer of control_plane_tick and
-- mirror_pull (runops.mirror_stale); `runops doctor` reads all three.
CREATE TABLE runops.heartbeats (
  source  text COLLATE "C" PRIMARY KEY CHECK (source IN ('control_plane_tick', 'run_ops_tick', 'mirror_pull')),
  beat_at timestamptz
);
ALTER TABLE runops.heartbeats OWNER TO runops_owner;
-- The rows exist from the start in both stores, so the replicated UPDATEs of control_plane_tick
-- always find theirs and no INSERT ever has to travel.
INSERT INTO runops.heartbeats (source) VALUES ('control_plane_tick'), ('run_ops_tick'), ('mirror_pull');
