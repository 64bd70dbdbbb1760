-- Bulk actions (SPEC §9 [1.3]): cancel or replay every run matching a list_runs filter, across
-- both stores (sql/functions/bulk_actions.sql; docs/operations-bulk-and-alerts.md).
--
--   bulk_actions          one action. Home: the control plane (both stores carry the table; the
--                         run-ops store reads the control plane's rows through the FDW)
--   bulk_action_members   the matched set, fixed at creation: every matching run of both stores
--                         created no later than the action. Home: the control plane, beside its
--                         action; the run-ops store reads its own part through the FDW. Deleted
--                         by tick once the action is over (members_pruned)
--   bulk_action_progress  on the store that acts on a part (the runs of one residency): a keyset
--                         cursor over that part's members and its counts, updated in the same
--                         transaction as the chunk it describes, which is what makes a crash or
--                         a second processor safe
CREATE TABLE runops.bulk_actions (
  id              text COLLATE "C" PRIMARY KEY,     -- bare cuid; friendly form bulk_<id>
  environment_id  text COLLATE "C" NOT NULL,
  kind            text NOT NULL CHECK (kind IN ('CANCEL', 'REPLAY')),
  -- PENDING until it is over: PROCESSING is read from the progress rows (get_bulk_action).
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
  run_id          text COLLATE "C" NOT NULL,        -- bare
  PRIMARY KEY (bulk_action_id, residency, run_id)
);

CREATE TABLE runops.bulk_action_progress (
  bulk_action_id  text COLLATE "C" NOT NULL,
  part            text NOT NULL CHECK (part IN ('LEGACY', 'NEW')),   -- the residency of the members walked
  last_run_id     text COLLATE "C",                  -- the keyset cursor: the last member acted on
  processed_count integer NOT NULL DEFAULT 0,
  affected_count  integer NOT NULL DEFAULT 0,
  finished_at     timestamptz,
  updated_at      timestamptz NOT NULL,
  last_error      text,                              -- why the last chunk did not commit (it is retried)
  PRIMARY KEY (bulk_action_id, part)
);

-- The row get_bulk_action and abort_bulk_action answer with.
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
