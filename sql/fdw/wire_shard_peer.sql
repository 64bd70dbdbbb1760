-- Wires the control plane's FDW to run-ops shard k >= 1 (docs/scale-out.md, "Mirror and FDW per
-- shard"): server and schema {server} (runops_peer_<k>); shard 0 stays runops_peer
-- (wire_peer.sql). Run by `runops migrate` (as a superuser) with {host} {port} {dbname} and the
-- mapping's {login} filled in; safe to re-run: it rebuilds the server, the mapping and the imported
-- tables from scratch.
--
-- It imports what the control plane asks of the shard that holds an environment: the claim
-- ledger and the runs its claims name (SPEC §6 across the seam), and a run read by id. The
-- functions reach these tables by EXECUTE (the schema exists only where the shard is wired), so
-- nothing here is needed to compile or check them.
CREATE EXTENSION IF NOT EXISTS postgres_fdw;
DROP SCHEMA IF EXISTS {server} CASCADE;
DROP SERVER IF EXISTS {server} CASCADE;
CREATE SERVER {server} FOREIGN DATA WRAPPER postgres_fdw
  OPTIONS (host {host}, port {port}, dbname {dbname}, fetch_size '1000', updatable 'false',
           application_name 'runops_peer', connect_timeout '5');
GRANT USAGE ON FOREIGN SERVER {server} TO runops_owner;
CREATE USER MAPPING FOR runops_owner SERVER {server} OPTIONS ({login});
CREATE SCHEMA {server} AUTHORIZATION runops_owner;
REVOKE ALL ON SCHEMA {server} FROM PUBLIC;
SET LOCAL ROLE runops_owner;
IMPORT FOREIGN SCHEMA runops
  LIMIT TO (runs, run_view, idempotency_claims, store_identity_view, peer_identity_view, xact_snapshot_view)
  FROM SERVER {server} INTO {server};
-- As on runops_peer, the claim ledger is the one foreign table the control plane writes.
ALTER FOREIGN TABLE {server}.idempotency_claims OPTIONS (ADD updatable 'true');
RESET ROLE;
