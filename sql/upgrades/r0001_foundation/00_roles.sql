-- r0001 as released: sql/schema/00_roles.sql, verbatim.
-- Roles are cluster-wide, so every statement here tolerates a cluster that already has them
-- (two runops databases may share one cluster).
--
--   runops_owner  NOLOGIN  owns every runops object; SECURITY DEFINER functions run as it.
--   runops_app    the role applications log in as (LOGIN and password are set by the operator,
--                 never by a migration): it may only EXECUTE the public functions.
--   runops_clock  members may freeze runops.now() with the session setting runops.fake_now.
--   runops_fdw    what the *other* store's postgres_fdw may do here (its per-database login,
--                 runops_fdw_<database>, created by `runops migrate`, is a member): it may
--                 read the run graph and the tenant tables, nothing else.
DO $$
DECLARE
  r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['runops_owner', 'runops_app', 'runops_clock', 'runops_fdw'] LOOP
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = r) THEN
      EXECUTE pg_catalog.format('CREATE ROLE %I NOLOGIN', r);
    END IF;
  END LOOP;
END
$$;

CREATE SCHEMA IF NOT EXISTS runops AUTHORIZATION runops_owner;
REVOKE ALL ON SCHEMA runops FROM PUBLIC;
GRANT USAGE ON SCHEMA runops TO runops_app, runops_fdw;

-- Every session reads this to know which store it is in; the migration history sets the row.
CREATE TABLE runops.store_config (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  store_role text NOT NULL CHECK (store_role IN ('CONTROL_PLANE', 'RUN_OPS'))
);
ALTER TABLE runops.store_config OWNER TO runops_owner;
GRANT SELECT ON runops.store_config TO runops_app, runops_fdw;

-- generate_cuid() is a plain (not SECURITY DEFINER) function, so its callers need the counter.
CREATE SEQUENCE runops.cuid_counter CYCLE MAXVALUE 1679615;
ALTER SEQUENCE runops.cuid_counter OWNER TO runops_owner;
GRANT USAGE ON SEQUENCE runops.cuid_counter TO runops_app;
