-- The store's runops revision: the newest revision whose functions are installed, by name.
-- Clients refuse a store older than they need (stores are upgraded before the applications);
-- a test keeps this text equal to the newest revision in migrations/.

CREATE OR REPLACE FUNCTION runops.store_version()
RETURNS text
LANGUAGE sql IMMUTABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
  SELECT 'r0006_fanout'::text
$$;
