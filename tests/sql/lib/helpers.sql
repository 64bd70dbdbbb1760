-- Shared by the pgTAP files (included with \ir right after BEGIN, so everything here rolls back
-- with the test). Not a test itself: pg_prove is pointed at common/, control_plane/ and run_ops/,
-- never at lib/.
--
-- The helpers live in pg_temp and are called schema-qualified (pg_temp.x), so they cannot
-- shadow anything and vanish with the session.

-- A fresh organization / project / environment, on whichever store this is.
--   control plane: through the public API (create_organization, create_project, create_environment);
--   run-ops: tenants arrive there through the mirror, which a rolled-back test cannot feed, so the
--   mirror rows are written directly (the tests run as the superuser).
CREATE FUNCTION pg_temp.make_env(mint_kind text DEFAULT NULL, env_type text DEFAULT 'PRODUCTION')
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  slug text := 'pgtap-' || pg_catalog.substr(pg_catalog.md5(pg_catalog.random()::text), 1, 12);
  org text;
  proj text;
  env text;
BEGIN
  IF runops.store_role() = 'CONTROL_PLANE' THEN
    org := runops.create_organization(slug, CASE WHEN mint_kind IS NULL THEN '{}'::jsonb
                                                 ELSE pg_catalog.jsonb_build_object('mint_kind', mint_kind) END);
    proj := runops.create_project(org, 'p');
    env := runops.create_environment(proj, 'e', env_type);
  ELSE
    org := runops.generate_cuid();
    proj := runops.generate_cuid();
    env := runops.generate_cuid();
    INSERT INTO runops.organizations (id, slug, title, mint_kind, created_at, updated_at)
    VALUES (org, slug, slug, mint_kind, pg_catalog.now(), pg_catalog.now());
    INSERT INTO runops.projects (id, organization_id, slug, created_at, updated_at)
    VALUES (proj, org, 'p', pg_catalog.now(), pg_catalog.now());
    INSERT INTO runops.runtime_environments (id, project_id, organization_id, slug, type, created_at, updated_at)
    VALUES (env, proj, org, 'e', env_type, pg_catalog.now(), pg_catalog.now());
  END IF;
  RETURN env;
END
$$;

-- Pause / archive an environment: update_environment on the control plane, the mirror row on run-ops.
CREATE FUNCTION pg_temp.update_env(env text, changes jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  IF runops.store_role() = 'CONTROL_PLANE' THEN
    PERFORM runops.update_environment(env, changes);
  ELSE
    UPDATE runops.runtime_environments AS e
    SET paused = coalesce((changes ->> 'paused')::boolean, e.paused),
        archived = coalesce((changes ->> 'archived')::boolean, e.archived),
        updated_at = pg_catalog.now()
    WHERE e.id = env;
  END IF;
END
$$;

-- The split settings row (on run-ops: its mirror), set directly for the test's transaction.
CREATE FUNCTION pg_temp.set_split(enabled boolean, ever_enabled boolean, default_mint_kind text DEFAULT 'cuid')
RETURNS void
LANGUAGE sql
AS $$
  UPDATE runops.split_settings AS s
  SET enabled = set_split.enabled, ever_enabled = set_split.ever_enabled,
      default_mint_kind = set_split.default_mint_kind
$$;

-- 'SQLSTATE' or 'SQLSTATE: DETAIL' of a statement that fails, NULL if it succeeds; the
-- statement's effects are rolled back either way. For checks throws_ok cannot make (DETAIL).
CREATE FUNCTION pg_temp.error_of(query text)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  state text;
  detail text;
BEGIN
  BEGIN
    EXECUTE query;
  EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, detail = PG_EXCEPTION_DETAIL;
    RETURN state || coalesce(': ' || nullif(detail, ''), '');
  END;
  RETURN NULL;
END
$$;

-- The dedup key exactly as SPEC §4 writes it, independent of runops.idempotency_key_hash.
CREATE FUNCTION pg_temp.spec_hash(key text, salt text[] DEFAULT '{}')
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
           pg_catalog.array_to_string(ARRAY[key] || salt, '-'), 'UTF8')), 'hex')
$$;
