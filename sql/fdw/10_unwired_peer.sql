-- runops_peer holds this store's view of the other store. Until `runops migrate` wires the
-- FDW it holds empty stand-ins of the same shape, so every function compiles and checks clean
-- in a single-database install, and reads of the other store's ids find nothing.
-- Wiring (sql/fdw/wire_peer.sql) replaces this schema with foreign tables.
CREATE SCHEMA runops_peer AUTHORIZATION runops_owner;
REVOKE ALL ON SCHEMA runops_peer FROM PUBLIC;
SET LOCAL ROLE runops_owner;
CREATE VIEW runops_peer.runs AS SELECT * FROM runops.runs WHERE false;
CREATE VIEW runops_peer.run_view AS SELECT * FROM runops.run_view WHERE false;
CREATE VIEW runops_peer.run_list_view AS SELECT * FROM runops.run_view WHERE false;
CREATE VIEW runops_peer.batches AS SELECT * FROM runops.batches WHERE false;
CREATE VIEW runops_peer.batch_items AS SELECT * FROM runops.batch_items WHERE false;
CREATE VIEW runops_peer.waitpoints AS SELECT * FROM runops.waitpoints WHERE false;
CREATE VIEW runops_peer.run_waitpoints AS SELECT * FROM runops.run_waitpoints WHERE false;
CREATE VIEW runops_peer.waitpoint_view AS SELECT * FROM runops.waitpoint_view WHERE false;
CREATE VIEW runops_peer.organizations AS SELECT * FROM runops.organizations WHERE false;
CREATE VIEW runops_peer.projects AS SELECT * FROM runops.projects WHERE false;
CREATE VIEW runops_peer.runtime_environments AS SELECT * FROM runops.runtime_environments WHERE false;
CREATE VIEW runops_peer.split_settings AS SELECT * FROM runops.split_settings WHERE false;
CREATE VIEW runops_peer.store_identity_view AS SELECT * FROM runops.store_identity_view WHERE false;
CREATE VIEW runops_peer.peer_identity_view AS SELECT * FROM runops.store_identity_view WHERE false;
CREATE VIEW runops_peer.idempotency_claims AS SELECT * FROM runops.idempotency_claims WHERE false;
CREATE VIEW runops_peer.xact_snapshot_view AS SELECT * FROM runops.xact_snapshot_view WHERE false;
CREATE VIEW runops_peer.environment_shards AS SELECT * FROM runops.environment_shards WHERE false;
CREATE VIEW runops_peer.bulk_actions AS SELECT * FROM runops.bulk_actions WHERE false;
CREATE VIEW runops_peer.bulk_action_members AS SELECT * FROM runops.bulk_action_members WHERE false;
CREATE VIEW runops_peer.bulk_action_progress AS SELECT * FROM runops.bulk_action_progress WHERE false;
CREATE VIEW runops_peer.alert_channels AS SELECT * FROM runops.alert_channels WHERE false;
RESET ROLE;
