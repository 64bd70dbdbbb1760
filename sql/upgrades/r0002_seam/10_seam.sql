-- r0002, across the seam: the idempotency claim ledger (sql/schema/35_idempotency_claims.sql)
-- and the snapshot view the run-ops store reads to judge a control-plane claim
-- (sql/fdw/00_identity_views.sql). Adds objects only: data stays in place.
--
-- Adjusted since its release, for the frozen-delta revisions (docs/decisions.md), in two ways:
-- * The unwired stand-ins it made in runops_peer (idempotency_claims, xact_snapshot_view,
--   run_list_view, and batches and split_settings again after their new columns) are gone from
--   here: the stand-ins are the repeatable step's now, made at head from
--   sql/fdw/10_unwired_peer.sql in every store that is not wired. A wired store, as before, gets
--   nothing from the upgrade: until `runops migrate` re-imports the foreign tables, a
--   control-plane keyed trigger fails loudly on the missing runops_peer.idempotency_claims
--   instead of claiming in the wrong place.
-- * DROP FUNCTION ... IF EXISTS: an upgrade from an empty database installs no function before
--   head, so there is nothing to drop; a store installed by the r0001 release has it.
CREATE TABLE runops.idempotency_claims (
  environment_id  text COLLATE "C" NOT NULL,
  task_identifier text NOT NULL,
  key_hash        text COLLATE "C" NOT NULL,
  run_id          text COLLATE "C" NOT NULL,
  claimant_xid    bigint,
  expires_at      timestamptz NOT NULL,
  claimed_at      timestamptz NOT NULL,
  PRIMARY KEY (environment_id, task_identifier, key_hash)
);
CREATE INDEX idempotency_claims_expiry_idx ON runops.idempotency_claims (expires_at);
ALTER TABLE runops.idempotency_claims OWNER TO runops_owner;
GRANT SELECT ON runops.idempotency_claims TO runops_fdw;
DO $$
BEGIN
  IF 'RESIDENCY_OF_THIS_STORE' = 'NEW' THEN
    GRANT INSERT, UPDATE ON runops.idempotency_claims TO runops_fdw;
  END IF;
END
$$;

CREATE VIEW runops.xact_snapshot_view AS SELECT pg_catalog.pg_current_snapshot()::text AS snapshot;
ALTER VIEW runops.xact_snapshot_view OWNER TO runops_owner;
GRANT SELECT ON runops.xact_snapshot_view TO runops_fdw;

-- create_run also reports the residency of the run it returns (a cached holder may live in the
-- other store): a new OUT column, so the old signature goes first.
DROP FUNCTION IF EXISTS runops.create_run(runops.environment_context, runops.runs, text, jsonb, runops.trigger_spec, text, jsonb);

-- list_runs (sql/functions/listing.sql): its filter type and its row (sql/schema/25_types.sql,
-- sql/schema/30_views.sql).
CREATE TYPE runops.list_filters AS (
  statuses         text[],
  task_identifiers text[],
  tags             text[],
  created_after    timestamptz,
  created_before   timestamptz,
  batch_id         text
);
ALTER TYPE runops.list_filters OWNER TO runops_owner;
CREATE VIEW runops.run_page_row AS SELECT v.*, NULL::text AS cursor FROM runops.run_view AS v WHERE false;
ALTER VIEW runops.run_page_row OWNER TO runops_owner;

-- Batch items claim their keys too, so an item may resolve to a run in the other store
-- (sql/schema/20_run_graph.sql): counted by reading it, not through final_count. A constant
-- default: no table rewrite.
ALTER TABLE runops.batches ADD COLUMN remote_items integer NOT NULL DEFAULT 0;
CREATE INDEX batches_remote_idx ON runops.batches (updated_at) WHERE status = 'PROCESSING' AND remote_items > 0;

-- When the ledger came to hold every key (sql/schema/10_tenants.sql). A store upgraded with the
-- split already enabled has keys no claim names: until `runops migrate` backfills them
-- (complete_claims_backfill) both stores check the other store's runs before trusting a claim.
ALTER TABLE runops.split_settings ADD COLUMN claims_backfilled_at timestamptz;
