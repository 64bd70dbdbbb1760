-- Bulk actions (SPEC §9 [1.3]): the action, its matched set and the per-store progress
-- (sql/schema/50_bulk_actions.sql says what each holds). New tables only: nothing existing is
-- locked or rewritten. The unwired stand-ins in runops_peer are re-made by the repeatable step;
-- a wired store's foreign tables are imported by `runops migrate` (sql/fdw/wire_peer.sql).
CREATE TABLE runops.bulk_actions (
  id              text COLLATE "C" PRIMARY KEY,
  environment_id  text COLLATE "C" NOT NULL,
  kind            text NOT NULL CHECK (kind IN ('CANCEL', 'REPLAY')),
  status          text NOT NULL CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'ABORTED')),
  filters         jsonb NOT NULL,
  reason          text,
  idempotency_key text,
  chunk_size      integer NOT NULL CHECK (chunk_size BETWEEN 1 AND 100000),
  matched_legacy  integer NOT NULL,
  matched_new     integer NOT NULL,
  created_at      timestamptz NOT NULL,
  completed_at    timestamptz,
  members_pruned  boolean NOT NULL DEFAULT false,
  UNIQUE (environment_id, idempotency_key)
);
CREATE INDEX bulk_actions_open_idx ON runops.bulk_actions (created_at) WHERE status IN ('PENDING', 'PROCESSING');
CREATE INDEX bulk_actions_unpruned_idx ON runops.bulk_actions (completed_at)
  WHERE status IN ('COMPLETED', 'ABORTED') AND NOT members_pruned;

CREATE TABLE runops.bulk_action_members (
  bulk_action_id  text COLLATE "C" NOT NULL,
  residency       text NOT NULL CHECK (residency IN ('LEGACY', 'NEW')),
  run_id          text COLLATE "C" NOT NULL,
  PRIMARY KEY (bulk_action_id, residency, run_id)
);

CREATE TABLE runops.bulk_action_progress (
  bulk_action_id  text COLLATE "C" NOT NULL,
  part            text NOT NULL CHECK (part IN ('LEGACY', 'NEW')),
  last_run_id     text COLLATE "C",
  processed_count integer NOT NULL DEFAULT 0,
  affected_count  integer NOT NULL DEFAULT 0,
  finished_at     timestamptz,
  updated_at      timestamptz NOT NULL,
  last_error      text,
  PRIMARY KEY (bulk_action_id, part)
);

CREATE TYPE runops.bulk_action_row AS (
  bulk_action_id  text,
  environment_id  text,
  kind            text,
  status          text,
  filters         jsonb,
  created_at      timestamptz,
  completed_at    timestamptz,
  matched_count   integer,
  processed_count integer,
  affected_count  integer
);

ALTER TABLE runops.bulk_actions OWNER TO runops_owner;
ALTER TABLE runops.bulk_action_members OWNER TO runops_owner;
ALTER TABLE runops.bulk_action_progress OWNER TO runops_owner;
ALTER TYPE runops.bulk_action_row OWNER TO runops_owner;
GRANT SELECT ON runops.bulk_actions, runops.bulk_action_members, runops.bulk_action_progress TO runops_fdw;
