-- Tenant tables and split settings.
--
-- The control plane is their home. The run-ops store holds a *mirror* of the same tables, kept
-- about a second behind by logical replication (publication runops_tenants on the control plane,
-- subscription runops_mirror on run-ops), so the run-ops hot path never crosses databases.
-- Because both stores carry identical definitions, the mirror needs no translation.
--
--   organizations          one tenant; mint_kind overrides the default mint kind under the split
--   projects               belong to an organization; deleted_at retires them
--   runtime_environments   where runs are triggered; paused / archived gate new work
--   split_settings         one row: is the split on, was it ever, which kind roots mint by default
--   split_audit            every accepted enable/disable, with who and what was compared

CREATE TABLE runops.organizations (
  id          text COLLATE "C" PRIMARY KEY,
  slug        text NOT NULL UNIQUE,
  title       text NOT NULL,
  mint_kind   text CHECK (mint_kind IN ('cuid', 'ksuid')),   -- NULL: follow the default
  runs_enabled boolean NOT NULL DEFAULT true,
  created_at  timestamptz NOT NULL,
  updated_at  timestamptz NOT NULL
);

CREATE TABLE runops.projects (
  id              text COLLATE "C" PRIMARY KEY,
  organization_id text COLLATE "C" NOT NULL REFERENCES runops.organizations (id),
  slug            text NOT NULL,
  deleted_at      timestamptz,
  created_at      timestamptz NOT NULL,
  updated_at      timestamptz NOT NULL,
  UNIQUE (organization_id, slug)
);

CREATE TABLE runops.runtime_environments (
  id                        text COLLATE "C" PRIMARY KEY,
  project_id                text COLLATE "C" NOT NULL REFERENCES runops.projects (id),
  organization_id           text COLLATE "C" NOT NULL REFERENCES runops.organizations (id),
  slug                      text NOT NULL,
  type                      text NOT NULL
                            CHECK (type IN ('DEVELOPMENT', 'STAGING', 'PREVIEW', 'PRODUCTION')),
  paused                    boolean NOT NULL DEFAULT false,
  archived                  boolean NOT NULL DEFAULT false,
  maximum_concurrency_limit integer NOT NULL DEFAULT 100 CHECK (maximum_concurrency_limit >= 0),
  notifications             boolean NOT NULL DEFAULT true,    -- final statuses notify (SPEC §4 Notifications)
  created_at                timestamptz NOT NULL,
  updated_at                timestamptz NOT NULL,
  -- `notifications: 'all'`: intermediate statuses notify too. A column of its own beside the
  -- boolean (not a text level): the mirror applies a replicated row the publisher wrote before
  -- or after either store was upgraded, whichever comes first (a subscriber may have extra
  -- columns; a text column would fail on an old boolean row in the replication stream for good).
  notify_every_status       boolean NOT NULL DEFAULT false,
  UNIQUE (project_id, slug),
  CONSTRAINT runtime_environments_notifications_check CHECK (notifications OR NOT notify_every_status)
);

CREATE TABLE runops.split_settings (
  singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  enabled           boolean NOT NULL DEFAULT false,
  ever_enabled      boolean NOT NULL DEFAULT false,
  default_mint_kind text NOT NULL DEFAULT 'cuid' CHECK (default_mint_kind IN ('cuid', 'ksuid')),
  updated_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- When the idempotency claim ledger came to hold every key of both stores (the first enable,
  -- or `runops migrate` after an upgrade from r0001). Until then a claim is checked against the
  -- other store's runs too (docs/idempotency-across-stores.md).
  claims_backfilled_at timestamptz
);

CREATE TABLE runops.split_audit (
  id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at           timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
  actor        text NOT NULL,                     -- session_user of the caller
  action       text NOT NULL,                     -- enable_split, disable_split, set_mint_kind, ...
  verdict      text NOT NULL,                     -- ACCEPTED, ACCEPTED_WITH_WARNING
  detail       jsonb NOT NULL DEFAULT '{}'
);

ALTER TABLE runops.organizations OWNER TO runops_owner;
ALTER TABLE runops.projects OWNER TO runops_owner;
ALTER TABLE runops.runtime_environments OWNER TO runops_owner;
ALTER TABLE runops.split_settings OWNER TO runops_owner;
ALTER TABLE runops.split_audit OWNER TO runops_owner;
GRANT SELECT ON runops.organizations, runops.projects, runops.runtime_environments,
                runops.split_settings
  TO runops_fdw;
