-- Which store this is (SPEC §4, identity functions) and what it knows of the split: plain
-- functions (no SECURITY DEFINER) that read nothing a caller may not see, and call nothing but
-- each other (the ground floor: docs/design.md, "Floors").
--
--   store_role, store_identity   this store's role and identity
--   peer_wired                   whether the FDW to the other store is wired
--   current_split_settings       the split settings row (on run-ops, the mirror's), or
--   split_settings_before_sync   the settings of a store that has none yet

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

-- Helpers that query are PL/pgSQL, not SQL: a non-inlinable SQL function called from PL/pgSQL
-- is parsed and planned again in every transaction, while PL/pgSQL keeps its plans.
CREATE OR REPLACE FUNCTION runops.peer_wired()
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN EXISTS (SELECT FROM pg_catalog.pg_foreign_server AS s WHERE s.srvname = 'runops_peer');
END
$$;

-- The split settings of a store that has no settings row yet (a run-ops store whose mirror has
-- not synced): never enabled, cuid roots.
CREATE OR REPLACE FUNCTION runops.split_settings_before_sync()
RETURNS runops.split_settings
LANGUAGE sql IMMUTABLE
AS $$
  SELECT ROW(true, false, false, 'cuid', NULL, NULL)::runops.split_settings
$$;

-- The settings row, or split_settings_before_sync().
CREATE OR REPLACE FUNCTION runops.current_split_settings()
RETURNS runops.split_settings
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  s split_settings;
BEGIN
  SELECT * INTO s FROM split_settings;
  IF NOT FOUND THEN
    s := split_settings_before_sync();
  END IF;
  RETURN s;
END
$$;
