-- Enabling the split fails closed with RO007 (SPEC §2): when no run-ops store is wired, and when
-- the "run-ops store" the FDW reaches is this very database. The FDW is rewired inside the test's
-- transaction (DDL rolls back with it). The self-wired server exposes only store_identity_view, so
-- the loop-back session never waits on a lock this transaction holds; a statement timeout guards
-- against a hang anyway.
BEGIN;
SET LOCAL search_path = tap, public;
SET LOCAL statement_timeout = '30s';
SET LOCAL client_min_messages = warning;
SELECT plan(8);

SELECT pg_catalog.count(*)::integer AS audit_rows_before FROM runops.split_audit \gset

-- 1. Unwired: no foreign server at all.
DROP SCHEMA runops_peer CASCADE;
DROP SERVER runops_peer CASCADE;
CREATE SCHEMA runops_peer AUTHORIZATION runops_owner;
CREATE VIEW runops_peer.store_identity_view AS SELECT * FROM runops.store_identity_view WHERE false;
CREATE VIEW runops_peer.peer_identity_view AS SELECT * FROM runops.store_identity_view WHERE false;
ALTER VIEW runops_peer.store_identity_view OWNER TO runops_owner;
ALTER VIEW runops_peer.peer_identity_view OWNER TO runops_owner;

SELECT is(runops.split_status() -> 'distinct', 'false'::jsonb, 'unwired: split_status() reports no distinct run-ops store');
SELECT throws_ok($$ SELECT runops.enable_split() $$, 'RO007', NULL, 'unwired: enable_split is refused with RO007');
SELECT is_empty($$ SELECT * FROM runops.peer_identity() $$, 'unwired: peer_identity() is empty');

-- 2. Wired to itself: the same system identifier and the same database.
DROP VIEW runops_peer.store_identity_view;
DO $$
BEGIN
  EXECUTE pg_catalog.format(
    'CREATE SERVER runops_peer FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host %L, port %L, dbname %L, updatable %L)',
    '127.0.0.1', pg_catalog.current_setting('port'), pg_catalog.current_database(), 'false');
END
$$;
GRANT USAGE ON FOREIGN SERVER runops_peer TO runops_owner;
CREATE USER MAPPING FOR runops_owner SERVER runops_peer OPTIONS (user 'postgres', password_required 'false');
SET LOCAL ROLE runops_owner;
IMPORT FOREIGN SCHEMA runops LIMIT TO (store_identity_view) FROM SERVER runops_peer INTO runops_peer;
RESET ROLE;

SELECT is((SELECT i.system_identifier FROM runops.peer_identity() AS i),
          (SELECT i.system_identifier FROM runops.store_identity() AS i),
          'self-wired: the FDW reaches this cluster');
SELECT is(runops.split_status() -> 'distinct', 'false'::jsonb, 'self-wired: split_status() reports no distinct run-ops store');
SELECT matches(runops.split_status() ->> 'reason', 'same physical database', 'self-wired: the reason says why');
SELECT throws_ok($$ SELECT runops.enable_split() $$, 'RO007', NULL, 'self-wired: enable_split is refused with RO007');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.split_audit), :audit_rows_before,
          'a refused enable_split leaves no audit row behind');

SELECT * FROM finish();
ROLLBACK;
