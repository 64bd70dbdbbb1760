-- r0006, alerts (SPEC §9 [1.3] Alerts): the channels (a tenant table, mirrored) and the outbox.
-- New tables only; the outbox trigger on runs and the functions are in sql/functions/alerts.sql
-- (the repeatable step). The channels join the tenant mirror when `runops migrate` rewires it
-- (the publication gains the table; the subscription refreshes without a copy: no channel
-- exists before this revision).
--
-- lock: runops.runtime_environments
CREATE TABLE runops.alert_channels (
  id             text COLLATE "C" PRIMARY KEY,
  environment_id text COLLATE "C" NOT NULL REFERENCES runops.runtime_environments (id),
  kind           text NOT NULL CHECK (kind IN ('WEBHOOK')),
  target         text NOT NULL,
  events         text[] NOT NULL,     -- the final statuses that alert
  secret         text,                -- signs each delivery (HMAC-SHA256), when set
  enabled        boolean NOT NULL DEFAULT true,
  created_at     timestamptz NOT NULL,
  updated_at     timestamptz NOT NULL,
  deleted_at     timestamptz
);
-- What the outbox trigger asks on every run turning final: only live channels are in it, so an
-- environment without channels costs one probe of an (often empty) index.
CREATE INDEX alert_channels_live_idx ON runops.alert_channels (environment_id)
  WHERE enabled AND deleted_at IS NULL;

CREATE TABLE runops.alerts (
  id              text COLLATE "C" PRIMARY KEY CHECK (RESIDENCY_CHECK(id)),
  channel_id      text COLLATE "C" NOT NULL,
  environment_id  text COLLATE "C" NOT NULL,
  run_id          text COLLATE "C" NOT NULL,
  run_status      text NOT NULL,
  status          text NOT NULL DEFAULT 'PENDING' CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
  attempt         integer NOT NULL DEFAULT 0,     -- deliveries begun (claims)
  next_attempt_at timestamptz NOT NULL,
  leased_by       text,                           -- the deliverer of the current attempt
  last_error      text,
  created_at      timestamptz NOT NULL,
  updated_at      timestamptz NOT NULL,
  completed_at    timestamptz                     -- DELIVERED or FAILED at
);
CREATE INDEX alerts_due_idx ON runops.alerts (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX alerts_failed_idx ON runops.alerts (environment_id) WHERE status = 'FAILED';
CREATE INDEX alerts_run_idx ON runops.alerts (run_id);

ALTER TABLE runops.alert_channels OWNER TO runops_owner;
ALTER TABLE runops.alerts OWNER TO runops_owner;
-- What complete_alert / fail_alert and delete_alert_channel answer (named types: their columns
-- repeat the functions' parameter names, which RETURNS TABLE cannot).
CREATE TYPE runops.alert_state AS (alert_id text, status text, attempt integer, next_attempt_at timestamptz,
                                   last_error text, completed_at timestamptz);
CREATE TYPE runops.alert_channel_state AS (channel_id text, environment_id text, kind text, target text,
                                           events text[], enabled boolean, created_at timestamptz,
                                           deleted_at timestamptz);
ALTER TYPE runops.alert_state OWNER TO runops_owner;
ALTER TYPE runops.alert_channel_state OWNER TO runops_owner;
-- The pull of the tenant mirror reads channels through the FDW.
GRANT SELECT ON runops.alert_channels TO runops_fdw;
