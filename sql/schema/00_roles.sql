-- Roles are cluster-wide, so every statement here tolerates a cluster that already has them
-- (two runops databases may share one cluster).
--
--   runops_owner  NOLOGIN  owns every runops object; SECURITY DEFINER functions run as it.
--   runops_api    NOLOGIN  holds what a service may do: EXECUTE on the public functions, USAGE on
--                 the schema and the cuid counter, SELECT on store_config. Services log in as
--                 their own roles, members of it. Nobody logs in as it and it owns nothing, so
--                 a member that SETs ROLE to it (PostgreSQL 15 cannot grant membership without
--                 SET) can change no login's password or settings and signal no backend.
--   runops_app    a ready-made service login, a member of runops_api (LOGIN and password are
--                 given by `runops dev up` or the operator, never by a migration). It must have
--                 no members: a member could SET ROLE to it and change its password.
--   runops_clock  members may freeze runops.now() with the session setting runops.fake_now.
--   runops_fdw    what the *other* store's postgres_fdw may do here (its per-database login,
--                 runops_fdw_<database>, created by `runops migrate`, is a member): it may
--                 read the run graph and the tenant tables, nothing else.
DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['runops_owner', 'runops_api', 'runops_app', 'runops_clock', 'runops_fdw'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
      EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
  IF NOT pg_catalog.pg_has_role('runops_app', 'runops_api', 'MEMBER') THEN
    GRANT runops_api TO runops_app;
  END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS runops AUTHORIZATION runops_owner;
REVOKE ALL ON SCHEMA runops FROM PUBLIC;
GRANT USAGE ON SCHEMA runops TO runops_fdw, runops_api;

-- Every session reads this to know which store it is in; the migration history sets the row.
-- The JSON limits (payload, metadata, output, error) are per store; an operator may change them
-- with UPDATE (check_json_bounds skips values below the smallest allowed limits: 64 KiB, 32 levels).
-- mirror_freshness_seconds (run-ops): the oldest tenant mirror new work may be admitted on
-- (SPEC §4 [1.2] freshness bound; runops.mirror_stale).
CREATE TABLE runops.store_config (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  store_role text NOT NULL CHECK (store_role IN ('CONTROL_PLANE', 'RUN_OPS')),
  max_json_bytes integer NOT NULL DEFAULT 3145728 CHECK (max_json_bytes BETWEEN 65536 AND 268435455),
  max_json_depth integer NOT NULL DEFAULT 64 CHECK (max_json_depth BETWEEN 32 AND 512),
  mirror_freshness_seconds integer NOT NULL DEFAULT 60 CHECK (mirror_freshness_seconds BETWEEN 1 AND 86400)
);
ALTER TABLE runops.store_config OWNER TO runops_owner;
GRANT SELECT ON runops.store_config TO runops_fdw, runops_api;

-- generate_cuid() is a plain (not SECURITY DEFINER) function, so its callers need the counter.
CREATE SEQUENCE runops.cuid_counter CYCLE MAXVALUE 1679615;
ALTER SEQUENCE runops.cuid_counter OWNER TO runops_owner;
GRANT USAGE ON SEQUENCE runops.cuid_counter TO runops_api;
