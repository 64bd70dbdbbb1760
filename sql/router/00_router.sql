-- The router database (SPEC §9 [1.3], docs/scale-out.md "The router database"): PL/Proxy in
-- front of N run-ops shards. It holds no run data: its cluster definition, its cache of the
-- control plane's environment -> shard assignment, and one wrapper per public function of the
-- run-ops SQL API (written by runops.ops.router from a shard's catalog). Applied by
-- `runops migrate --router-url` as a superuser; safe to re-run.
CREATE EXTENSION IF NOT EXISTS plproxy;
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'runops_owner') THEN
    CREATE ROLE runops_owner NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'runops_api') THEN
    CREATE ROLE runops_api NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'runops_app') THEN
    CREATE ROLE runops_app NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'runops_clock') THEN
    CREATE ROLE runops_clock NOLOGIN;  -- as on the stores: who may set the test clock
  END IF;
  IF NOT pg_catalog.pg_has_role('runops_app', 'runops_api', 'MEMBER') THEN
    GRANT runops_api TO runops_app;  -- as on the stores: services are members of runops_api
  END IF;
END
$$;
CREATE SCHEMA IF NOT EXISTS runops AUTHORIZATION runops_owner;
CREATE SCHEMA IF NOT EXISTS runops_route AUTHORIZATION runops_owner;
CREATE SCHEMA IF NOT EXISTS plproxy;
REVOKE ALL ON SCHEMA runops, runops_route FROM PUBLIC;
GRANT USAGE ON SCHEMA runops TO runops_api;

-- The cluster definition: one row per shard (its libpq connection string, with the router's own
-- login on that shard) and the control plane (shard NULL: asked for environment assignments).
CREATE TABLE IF NOT EXISTS runops.router_shards (
  shard   integer PRIMARY KEY CHECK (shard BETWEEN -1 AND 255),   -- -1: the control plane
  connstr text NOT NULL
);
-- shard_count: the shards the definition has (0 .. count-1, contiguous); shard_ids_since: the
-- deployment's cut-over second for shard-aware ids (store_config.shard_ids_since); version: bumped
-- on every rewrite, which makes PL/Proxy drop its connections and read the definition again.
CREATE TABLE IF NOT EXISTS runops.router_config (
  singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  shard_count     integer NOT NULL CHECK (shard_count BETWEEN 1 AND 256),
  shard_ids_since bigint NOT NULL,
  version         integer NOT NULL DEFAULT 1
);
-- Assignments read from the control plane. An assignment does not change once an environment has
-- a NEW run (pinning is refused then), and a shard refuses work for an environment not its own,
-- so a cached row is never a mis-routed write.
CREATE TABLE IF NOT EXISTS runops.router_environment_cache (
  environment_id text COLLATE "C" PRIMARY KEY,
  shard          integer NOT NULL
);
ALTER TABLE runops.router_shards OWNER TO runops_owner;
ALTER TABLE runops.router_config OWNER TO runops_owner;
ALTER TABLE runops.router_environment_cache OWNER TO runops_owner;
-- shard_of is a plain identity function on the router too: the application reads the config row
-- it needs (no connection strings: those are the owner's).
GRANT SELECT ON runops.router_config TO runops_api;

-- PL/Proxy's cluster configuration API. Partition counts must be powers of two: the next one at or
-- above the shard count, partition p < count is shard p, and the spare partitions repeat shard 0
-- (the wrappers never route there: they refuse a shard the definition lacks before calling).
-- PL/Proxy asks for the version on every call: PL/pgSQL, whose plan is cached (a SQL function
-- reading a table is planned again on each call).
CREATE OR REPLACE FUNCTION plproxy.get_cluster_version(cluster_name text)
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN (SELECT c.version FROM runops.router_config AS c);
END
$$;

CREATE OR REPLACE FUNCTION plproxy.get_cluster_partitions(cluster_name text)
RETURNS SETOF text
LANGUAGE sql STABLE
AS $$
  SELECT CASE WHEN cluster_name = 'runops_control' THEN cp.connstr
              ELSE coalesce(s.connstr, s0.connstr) || ' application_name=runops_router_p' || p END
  FROM runops.router_config AS c
  CROSS JOIN LATERAL pg_catalog.generate_series(
      0, CASE WHEN cluster_name = 'runops_control' THEN 0
              ELSE (2 ^ pg_catalog.ceil(pg_catalog.log(2, c.shard_count::numeric)))::integer - 1 END) AS p
  LEFT JOIN runops.router_shards AS s ON s.shard = p AND cluster_name = 'runops'
  LEFT JOIN runops.router_shards AS s0 ON s0.shard = 0
  LEFT JOIN runops.router_shards AS cp ON cp.shard = -1
  WHERE cluster_name IN ('runops', 'runops_control')
  ORDER BY p
$$;

CREATE OR REPLACE FUNCTION plproxy.get_cluster_config(IN cluster_name text, OUT key text, OUT val text)
RETURNS SETOF record
LANGUAGE sql STABLE
AS $$
  VALUES ('connection_lifetime', '1800')
$$;

-- The router's shard_of: the shards' decoding (shard_of_id, installed here from
-- sql/functions/shards.sql) with the deployment's cut-over second. The helpers that read the
-- config are PL/pgSQL: a SQL function with a FROM is planned again on every call (~140 µs here).
CREATE OR REPLACE FUNCTION runops.shard_of(id text)
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN runops.shard_of_id(id, (SELECT c.shard_ids_since FROM runops.router_config AS c)::integer);
END
$$;

CREATE OR REPLACE FUNCTION runops.router_shard_count()
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN (SELECT c.shard_count FROM runops.router_config AS c);
END
$$;

-- Where a call naming an id goes. LEGACY and unclassifiable ids go to shard 0, which answers as
-- any run-ops store does (reads through to the control plane; RO001, RO002 for writes). An id of
-- a shard this definition lacks: a read goes to shard 0, which holds no such row (no row); a
-- write is refused here — a shard added without rewriting the router, or an id of no shard.
CREATE OR REPLACE FUNCTION runops.route_id(id text, is_write boolean, kind text)
RETURNS integer
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  count integer;
  since integer;
  shard integer;
BEGIN
  SELECT c.shard_count, c.shard_ids_since INTO count, since FROM runops.router_config AS c;
  IF count = 1 THEN
    RETURN 0;
  END IF;
  shard := runops.shard_of_id(id, since);
  IF shard IS NULL THEN
    RETURN 0;
  END IF;
  IF shard >= count THEN
    IF NOT is_write THEN
      RETURN 0;
    END IF;
    RAISE EXCEPTION '% % names run-ops shard %, which this router''s cluster definition does not have (shards 0 to %)',
                    kind, left(id, 100), shard, count - 1
      USING ERRCODE = 'RO002', DETAIL = 'owning_store=RUN_OPS',
            HINT = 'if a shard was added, run runops migrate with every --run-ops-url and --router-url';
  END IF;
  RETURN shard;
END
$$;

-- Where a call naming an environment goes: its assignment (cached; read from the control plane on
-- a miss). An environment nobody assigned goes to shard 0, which answers for it as any run-ops
-- store does (RO004, or no rows). An assignment to a shard the definition lacks is refused.
CREATE OR REPLACE FUNCTION runops.route_environment(environment_id text)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  count integer;
  shard integer;
BEGIN
  SELECT c.shard_count INTO count FROM runops.router_config AS c;
  IF count = 1 OR environment_id IS NULL THEN
    RETURN 0;
  END IF;
  SELECT c.shard INTO shard FROM runops.router_environment_cache AS c WHERE c.environment_id = route_environment.environment_id;
  IF shard IS NULL THEN
    BEGIN
      shard := runops.control_environment_shard(environment_id);
    EXCEPTION WHEN OTHERS THEN
      IF SQLSTATE LIKE 'RO%' THEN
        RAISE;
      END IF;
      RAISE EXCEPTION 'the control plane is unavailable (the router reads environment %''s shard there): %',
                      left(environment_id, 100), SQLERRM USING ERRCODE = 'RO009';
    END;
    IF shard IS NULL THEN
      RETURN 0;
    END IF;
    INSERT INTO runops.router_environment_cache VALUES (environment_id, shard) ON CONFLICT DO NOTHING;
  END IF;
  IF shard >= count THEN
    RAISE EXCEPTION 'environment % lives on run-ops shard %, which this router''s cluster definition does not have (shards 0 to %)',
                    left(environment_id, 100), shard, count - 1
      USING ERRCODE = 'RO009',
            HINT = 'a shard was added: run runops migrate with every --run-ops-url and --router-url';
  END IF;
  RETURN shard;
END
$$;

CREATE OR REPLACE FUNCTION runops.control_environment_shard(environment_id text)
RETURNS integer
LANGUAGE plproxy
AS $$
  CLUSTER 'runops_control';
  RUN ON 0;
  SELECT runops.environment_shard($1);
$$;

-- A shard's error, as the caller of a single store would see it. PL/Proxy keeps the SQLSTATE but
-- prefixes the message ("runops_route.f(3): [db] REMOTE ERROR: ") and the detail and hint
-- ("Remote detail: "); those prefixes go. A shard PL/Proxy cannot reach (XX000 from libpq) is
-- RO009 naming the shard. Every other error passes unchanged.
CREATE OR REPLACE FUNCTION runops.reraise(shard integer, state text, message text, detail text, hint text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  IF state = 'XX000' AND message !~ 'REMOTE ERROR'
     AND message ~ '(PQconnect|PQconsumeInput|PQsend|PQflush|connection|server closed)' THEN
    state := 'RO009';
    message := format('run-ops shard %s is unavailable: %s', shard,
                      regexp_replace(message, '^.*?: \[[^]]*\] ', ''));
    detail := '';
    hint := '';
  END IF;
  message := regexp_replace(message, '^.*?: \[[^]]*\] REMOTE ERROR: ', '');
  detail := regexp_replace(coalesce(detail, ''), '^Remote detail: ', '');
  hint := regexp_replace(coalesce(hint, ''), '^Remote hint: ', '');
  IF detail <> '' AND hint <> '' THEN
    RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message, DETAIL = detail, HINT = hint;
  ELSIF detail <> '' THEN
    RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message, DETAIL = detail;
  ELSIF hint <> '' THEN
    RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message, HINT = hint;
  END IF;
  RAISE EXCEPTION USING ERRCODE = state, MESSAGE = message;
END
$$;

-- Sums the jsonb objects of counts each shard answered (tick).
CREATE OR REPLACE FUNCTION runops.sum_counts(a jsonb, b jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
  SELECT coalesce(jsonb_object_agg(k, CASE WHEN jsonb_typeof(coalesce(a -> k, b -> k)) = 'number'
                                             THEN to_jsonb(coalesce((a ->> k)::numeric, 0) + coalesce((b ->> k)::numeric, 0))
                                             ELSE coalesce(b -> k, a -> k) END), '{}'::jsonb)
  FROM (SELECT jsonb_object_keys(coalesce(a, '{}')) UNION SELECT jsonb_object_keys(coalesce(b, '{}'))) AS keys(k)
$$;

-- The caller's test clock (SPEC §3: runops.fake_now, honoured for members of runops_clock), sent
-- to the shard with every call, which sets it on its session before the call; the shard honours
-- it only when the router's own login there is a member of runops_clock too (tests grant that).
-- '' (the real clock) for everyone else, so a shard session never keeps another caller's clock.
CREATE OR REPLACE FUNCTION runops.router_clock()
RETURNS text
LANGUAGE sql STABLE
AS $$
  SELECT CASE WHEN pg_catalog.pg_has_role(session_user, 'runops_clock', 'MEMBER')
              THEN coalesce(pg_catalog.current_setting('runops.fake_now', true), '') ELSE '' END
$$;
