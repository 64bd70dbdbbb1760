-- Services are members of runops_api, a NOLOGIN role nobody logs in as (sql/schema/00_roles.sql).
-- Until r0004 the grants were runops_app's, and runops_app was both the group services joined
-- and a login (`runops dev up`, the README's first option): a member could SET ROLE runops_app
-- and change its password or settings, or signal its backends. In place, with the logins working
-- throughout (one transaction):
--   * runops_api is created and runops_app joins it, so a runops_app login keeps every right;
--   * every member of runops_app becomes a member of runops_api instead (keeping its ADMIN
--     OPTION), so no service can SET ROLE to a role someone logs in as;
--   * runops_app's own grants here are revoked; sql/after_functions.sql, applied after this
--     file, grants the functions to runops_api.
-- Roles are cluster-wide: a member moved here reaches another runops database of the same
-- cluster through runops_api once that database is upgraded too (`runops migrate` upgrades both
-- stores back to back; docs/decisions.md).
DO $$
DECLARE
  m record;
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'runops_api') THEN
    CREATE ROLE runops_api NOLOGIN;
  END IF;
  IF NOT pg_catalog.pg_has_role('runops_app', 'runops_api', 'MEMBER') THEN
    GRANT runops_api TO runops_app;
  END IF;
  FOR m IN SELECT a.member::regrole::text AS member, a.admin_option
           FROM pg_catalog.pg_auth_members AS a
           WHERE a.roleid = 'runops_app'::regrole LOOP
    EXECUTE pg_catalog.format('GRANT runops_api TO %s%s', m.member,
                              CASE WHEN m.admin_option THEN ' WITH ADMIN OPTION' ELSE '' END);
    EXECUTE pg_catalog.format('REVOKE runops_app FROM %s', m.member);
  END LOOP;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA runops FROM runops_app;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA runops FROM runops_app;
REVOKE ALL ON ALL TABLES IN SCHEMA runops FROM runops_app;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA runops FROM runops_app;
REVOKE ALL ON SCHEMA runops FROM runops_app;
-- runops_api's USAGE takes the place a fresh install gives it, before the logins `runops migrate`
-- granted it later (the mirror's): the same ACL as a fresh store's, so their dumps compare equal.
DO $$
DECLARE
  later text[];
BEGIN
  SELECT pg_catalog.array_agg(a.grantee::regrole::text ORDER BY n) INTO later
  FROM pg_catalog.pg_namespace AS s, pg_catalog.aclexplode(s.nspacl) WITH ORDINALITY AS a(grantor, grantee, privilege_type, is_grantable, n)
  WHERE s.nspname = 'runops' AND a.privilege_type = 'USAGE' AND NOT a.is_grantable
    AND a.grantee NOT IN (0, s.nspowner, 'runops_fdw'::regrole, 'runops_api'::regrole);
  IF later IS NOT NULL THEN
    EXECUTE 'REVOKE USAGE ON SCHEMA runops FROM ' || pg_catalog.array_to_string(later, ', ');
  END IF;
  GRANT USAGE ON SCHEMA runops TO runops_api;
  IF later IS NOT NULL THEN
    EXECUTE 'GRANT USAGE ON SCHEMA runops TO ' || pg_catalog.array_to_string(later, ', ');
  END IF;
END
$$;
GRANT SELECT ON runops.store_config TO runops_api;
GRANT USAGE ON SEQUENCE runops.cuid_counter TO runops_api;
