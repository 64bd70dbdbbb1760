-- Wires this store's read-through view of the other store. Run by `runops migrate` (as a
-- superuser) with {host} {port} {dbname} and the mapping's {login} options filled in; safe to re-run: it
-- rebuilds the server, the mapping and the imported tables from scratch, which also picks up
-- run-graph changes made by newer migrations.
--
-- The mapping belongs to runops_owner (the SECURITY DEFINER functions run as it) and logs in as
-- runops_fdw, which may read the run graph and the tenant tables and nothing else.
CREATE EXTENSION IF NOT EXISTS postgres_fdw;
DROP SCHEMA IF EXISTS runops_peer CASCADE;
DROP SERVER IF EXISTS runops_peer CASCADE;
-- connect_timeout: a peer that drops packets (rather than refusing) fails a call in 5 s with
-- RO009, instead of holding it for the kernel's TCP timeout (statement_timeout does not cover
-- postgres_fdw's connect).
CREATE SERVER runops_peer FOREIGN DATA WRAPPER postgres_fdw
  OPTIONS (host {host}, port {port}, dbname {dbname}, fetch_size '1000', updatable 'false',
           application_name 'runops_peer', connect_timeout '5');
GRANT USAGE ON FOREIGN SERVER runops_peer TO runops_owner;
CREATE USER MAPPING FOR runops_owner SERVER runops_peer OPTIONS ({login});
CREATE SCHEMA runops_peer AUTHORIZATION runops_owner;
REVOKE ALL ON SCHEMA runops_peer FROM PUBLIC;
SET LOCAL ROLE runops_owner;
IMPORT FOREIGN SCHEMA runops
  LIMIT TO (runs, run_view, batches, batch_items, waitpoints, waitpoint_view, run_waitpoints, organizations, projects,
            runtime_environments, split_settings, store_identity_view, peer_identity_view, idempotency_claims,
            environment_shards, alert_channels,
            bulk_actions, bulk_action_members, bulk_action_progress,
            xact_snapshot_view)
  FROM SERVER runops_peer INTO runops_peer;
-- The claim ledger is the one foreign table this store writes (SPEC §5); the remote login may
-- write nothing else.
ALTER FOREIGN TABLE runops_peer.idempotency_claims OPTIONS (ADD updatable 'true');
-- list_runs reads the other store's run_view through a second foreign table with remote
-- estimates, which let the planner see that the other store answers the keyset query in order
-- from its index: ORDER BY is shipped and the fetch stops at the page (docs/listing.md). Only
-- this table asks the remote at plan time, so reads by id plan without a round trip. Its
-- columns are this store's run_view's: both stores run the same revision.
DO $$
DECLARE
  columns text;
BEGIN
  SELECT string_agg(pg_catalog.format('%I %s%s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
                                      CASE WHEN a.attcollation NOT IN (0, 100)
                                           THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END),
                    ', ' ORDER BY a.attnum)
  INTO columns
  FROM pg_catalog.pg_attribute AS a
  WHERE a.attrelid = 'runops.run_view'::regclass AND a.attnum > 0 AND NOT a.attisdropped;
  -- fetch_size: a page is at most 200 rows, 25 by default; the server's 1,000 made the other
  -- store produce and ship twenty times the page (measured: 12x slower merged pages).
  EXECUTE pg_catalog.format('CREATE FOREIGN TABLE runops_peer.run_list_view (%s) SERVER runops_peer '
                            'OPTIONS (schema_name %L, table_name %L, use_remote_estimate %L, fetch_size %L)',
                            columns, 'runops', 'run_view', 'true', '100');
END
$$;
RESET ROLE;
