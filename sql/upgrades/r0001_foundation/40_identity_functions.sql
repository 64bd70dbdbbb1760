-- r0001's DDL needs these two functions: the identity views (50_identity_views.sql) select from
-- them, and a view can only be made over a function that exists. Their r0001 text, verbatim
-- (sql/functions/identity.sql and sql/functions/split.sql as released). Bodies are not checked
-- at creation (the runner sets check_function_bodies off), so what they call need not exist yet.
--
-- Everything else r0001 applied is the repeatable part now, re-applied at head from the live
-- files: every function file, sql/after_functions.sql (ownership, grants, and in r0001 the two
-- status triggers on runs, which sql/functions/lifecycle.sql creates since r0002), and the
-- unwired stand-ins of sql/fdw/10_unwired_peer.sql.
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

-- The other store's identity, read through the FDW.
CREATE OR REPLACE FUNCTION runops.peer_identity()
RETURNS TABLE (system_identifier text, database_name text, database_oid bigint, store_role text,
               server_version text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  IF peer_wired() THEN
    RETURN QUERY SELECT i.system_identifier, i.database_name, i.database_oid, i.store_role, i.server_version
                 FROM runops_peer.store_identity_view AS i;
  END IF;
END
$$;
