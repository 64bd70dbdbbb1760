-- What each store shows the other through postgres_fdw about itself. A foreign table cannot
-- call a remote function, but it can read a remote view that does.
--
--   store_identity_view  who I am
--   peer_identity_view   who my FDW reaches (so the control plane can check that the run-ops
--                        store's FDW points back at it: both directions must agree)
--   xact_snapshot_view   the snapshot the reader's remote transaction sees, so the run-ops store
--                        can tell whether a control-plane claimant had finished by then (§6)
CREATE VIEW runops.store_identity_view AS SELECT * FROM runops.store_identity();
CREATE VIEW runops.peer_identity_view AS SELECT * FROM runops.peer_identity();
ALTER VIEW runops.store_identity_view OWNER TO runops_owner;
ALTER VIEW runops.peer_identity_view OWNER TO runops_owner;
CREATE VIEW runops.xact_snapshot_view AS SELECT pg_catalog.pg_current_snapshot()::text AS snapshot;
ALTER VIEW runops.xact_snapshot_view OWNER TO runops_owner;
GRANT SELECT ON runops.store_identity_view, runops.peer_identity_view, runops.xact_snapshot_view TO runops_fdw;
