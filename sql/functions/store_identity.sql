-- Which store this is (SPEC §4, identity functions): store_role and store_identity, plain
-- functions (no SECURITY DEFINER) that read nothing a caller may not see.

CREATE OR REPLACE FUNCTION runops.store_role()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
  SELECT c.store_role FROM runops.store_config AS c
$$;

CREATE OR REPLACE FUNCTION runops.store_identity(
  OUT system_identifier text, OUT database_name text, OUT database_oid bigint,
  OUT store_role text, OUT server_version text)
RETURNS SETOF record
LANGUAGE sql STABLE
AS $$
  SELECT (pg_catalog.pg_control_system()).system_identifier::text,
         pg_catalog.current_database()::text,
         d.oid::bigint,
         runops.store_role(),
         pg_catalog.current_setting('server_version')
  FROM pg_catalog.pg_database AS d
  WHERE d.datname = pg_catalog.current_database()
$$;
