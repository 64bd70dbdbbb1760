-- Shards (SPEC §9 [1.3], docs/scale-out.md): which run-ops shard an id or an environment lives on.
--
--   shard_of_id            the shard a NEW id names, given the deployment's shard_ids_since (pure;
--                          the router installs it too)
--   shard_of               public: the same with this store's shard_ids_since; NULL for LEGACY ids
--   local_shard            this store's shard number
--   shard_config           public: this store's shard number, the shard count and the cut-over second
--   refuse_other_shard     a write naming a NEW id of another shard: RO002 naming the shard
--   shard_for_new_environment   the default assignment: a stable hash over the shard count
--   environment_shard      public: the shard an environment lives on (NULL when unknown)
--   assign_environment_shard    trigger: a new environment gets its shard on the control plane
--   pin_environment_shard  public (control plane): an operator's choice, before any NEW run
--   shard_peer             control plane: its FDW schema for shard k >= 1, or RO009 when not wired

-- A NEW id's shard is byte 4 of its 20 raw bytes. The first 9 base62 characters fix the top 40
-- bits (seconds and that byte) of every id minted with the shard byte: the minter keeps the bits
-- below byte 4 within [2^112, 2^119), and 62^18 < 2^112 (docs/scale-out.md, "Ids name their
-- shard"). Those 9 characters are at most 62^9 - 1, a bigint; one numeric product and division
-- give the 40 bits. An id minted before shards existed (seconds below ids_since) is shard 0's.
-- The decoded second is never later than the id's true one, so such an id never passes for new.
CREATE OR REPLACE FUNCTION runops.base62_digit(ch text)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT (pg_catalog.strpos('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', ch) - 1)::bigint
$$;

-- The top 40 bits of a bare KSUID minted with a shard byte. Every function here is one
-- expression, so PostgreSQL inlines them into the calling query.
CREATE OR REPLACE FUNCTION runops.ksuid_top40(bare text)
RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.div((
               runops.base62_digit(pg_catalog.substr(bare, 1, 1)) * 218340105584896::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 2, 1)) * 3521614606208::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 3, 1)) * 56800235584::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 4, 1)) * 916132832::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 5, 1)) * 14776336::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 6, 1)) * 238328::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 7, 1)) * 3844::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 8, 1)) * 62::bigint
             + runops.base62_digit(pg_catalog.substr(bare, 9, 1)) * 1::bigint)::numeric
           * 183252712161029662582812243656704::numeric,              -- 62^18
           1329227995784915872903807060280344576::numeric)::bigint   -- 2^120
$$;

CREATE OR REPLACE FUNCTION runops.shard_of_top40(top40 bigint, ids_since integer)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT CASE WHEN top40 / 256 < ids_since THEN 0 ELSE (top40 % 256)::integer END
$$;

CREATE OR REPLACE FUNCTION runops.shard_of_id(id text, ids_since integer)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT CASE WHEN runops.try_classify_residency(id) = 'NEW'
              THEN runops.shard_of_top40(runops.ksuid_top40(pg_catalog.regexp_replace(id, '^[a-z]+_', '')), ids_since)
         END
$$;

-- PL/pgSQL: it reads the store's cut-over second in a cached plan and calls the inlined decoding.
CREATE OR REPLACE FUNCTION runops.shard_of(id text)
RETURNS integer
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
  RETURN runops.shard_of_id(id, (SELECT c.shard_ids_since FROM runops.store_config AS c)::integer);
END
$$;

CREATE OR REPLACE FUNCTION runops.local_shard()
RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
  SELECT c.shard_number FROM runops.store_config AS c
$$;

-- What a client routing straight to the shards needs from each store, asked once when it first
-- reaches it: which shard it is (checked against the URL's position), how many there are, and
-- the second before which NEW ids live on shard 0 (the same on every store of a deployment).
CREATE OR REPLACE FUNCTION runops.shard_config()
RETURNS TABLE (shard_number integer, shard_count integer, shard_ids_since bigint)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
  SELECT c.shard_number, c.shard_count, c.shard_ids_since FROM runops.store_config AS c
$$;

-- A write naming a NEW row (bare id) this run-ops store holds must name this store's shard: a
-- router or client with a stale map must never write here what another shard owns. With one
-- shard every NEW id is this store's (ids minted by other tools carry a random byte 4), so
-- nothing is decoded. refuse_other_shard is the test and raises RO002 when it fails. PL/pgSQL
-- statements rather than an inlined predicate: the caller knows the id when it plans, so a
-- predicate's decoding folds to a constant and PostgreSQL plans a custom plan on every call.
CREATE OR REPLACE FUNCTION runops.refuse_other_shard(bare text, kind text, id text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  cfg record;
  owner integer;
BEGIN
  SELECT c.shard_number, c.shard_count, c.shard_ids_since INTO cfg FROM store_config AS c;
  IF cfg.shard_count = 1 THEN
    RETURN;
  END IF;
  owner := shard_of_id(bare, cfg.shard_ids_since::integer);
  IF owner <> cfg.shard_number THEN
    PERFORM raise_error('RO002',
      CASE WHEN owner < cfg.shard_count
           THEN format('%s %s lives on run-ops shard %s, not on this shard %s', kind, input_prefix(id), owner,
                       cfg.shard_number)
           ELSE format('%s %s names run-ops shard %s, which this deployment does not have (shards 0 to %s)', kind,
                       input_prefix(id), owner, cfg.shard_count - 1) END,
      'owning_store=RUN_OPS',
      format('owning_shard=%s: call the router, or the shard the id names (runops.shard_of)', owner));
  END IF;
END
$$;

-- The default shard of a new environment: the first 4 bytes of sha256(id), unsigned, modulo the
-- shard count. sha256 rather than hashtext: the same in every PostgreSQL version and in Python.
CREATE OR REPLACE FUNCTION runops.shard_for_new_environment(environment_id text, shard_count integer)
RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT (('x' || pg_catalog.encode(pg_catalog.substr(pg_catalog.sha256(pg_catalog.convert_to(environment_id, 'UTF8')), 1, 4),
                                    'hex'))::bit(32)::bigint % shard_count)::integer
$$;

-- The shard an environment lives on: its assignment (mirrored on run-ops; a mirror miss reads the
-- control plane through the FDW), NULL for an environment nobody assigned.
CREATE OR REPLACE FUNCTION runops.environment_shard(environment_id text)
RETURNS integer
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  found integer;
BEGIN
  SELECT s.shard INTO found FROM environment_shards AS s WHERE s.environment_id = environment_shard.environment_id;
  IF found IS NULL AND local_residency() = 'NEW' AND peer_wired() THEN
    BEGIN
      SELECT s.shard INTO found FROM runops_peer.environment_shards AS s
      WHERE s.environment_id = environment_shard.environment_id;
    EXCEPTION WHEN connection_exception OR undefined_table THEN
      found := NULL;  -- a peer of an older release, or unreachable: unknown, as for a new tenant
    END;
  END IF;
  RETURN found;
END
$$;

-- A new environment gets its shard where it is created (the control plane): the default hash
-- over the configured count, fixed from then on, so adding a shard later moves nobody. Rows the
-- mirror writes on run-ops (replication does not fire this trigger; the pull does) are skipped:
-- their assignment arrives with the mirror.
CREATE OR REPLACE FUNCTION runops.assign_environment_shard()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  IF local_residency() = 'LEGACY' THEN
    INSERT INTO environment_shards (environment_id, shard)
    SELECT NEW.id, shard_for_new_environment(NEW.id, c.shard_count) FROM store_config AS c
    ON CONFLICT (environment_id) DO NOTHING;
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER runtime_environments_assign_shard
  AFTER INSERT ON runops.runtime_environments
  FOR EACH ROW EXECUTE FUNCTION runops.assign_environment_shard();

-- The control plane's FDW schema for run-ops shard k >= 1, for `subject` (what lives there: "environment
-- e", "run r"). A shard this control plane has no server for is an error naming it and the fix,
-- never a claim in another shard's ledger, where the environment's own triggers would not see it.
CREATE OR REPLACE FUNCTION runops.shard_peer(shard integer, subject text)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  peer constant text := 'runops_peer_' || shard;
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_foreign_server AS s
                 JOIN pg_catalog.pg_namespace AS n ON n.nspname = s.srvname
                 WHERE s.srvname = peer) THEN
    PERFORM raise_error('RO009', format('%s lives on run-ops shard %s, which this control plane has no FDW server '
                                        'for (%s)', subject, shard, peer),
                        NULL, 'run `runops migrate` with every shard''s --run-ops-url, shard 0 first');
  END IF;
  RETURN peer;
END
$$;

-- An operator's choice of shard, on the control plane, before the environment's first NEW run:
-- after it, the runs would be left behind on the old shard (moving is docs/scale-out.md's
-- "Moving an environment later"). The control plane looks on the environment's current shard
-- through its FDW server for it (shard_peer): a shard it has no server for is RO009, since it
-- cannot tell.
CREATE OR REPLACE FUNCTION runops.pin_environment_shard(environment_id text, shard integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  env_id text := pin_environment_shard.environment_id;
  current_shard integer;
  count integer;
  peer text;
  has_runs boolean;
BEGIN
  IF store_role() <> 'CONTROL_PLANE' THEN
    PERFORM raise_wrong_store('environment', env_id, 'CONTROL_PLANE');
  END IF;
  SELECT c.shard_count INTO count FROM store_config AS c;
  IF pin_environment_shard.shard IS NULL OR pin_environment_shard.shard NOT BETWEEN 0 AND count - 1 THEN
    PERFORM raise_invalid('shard', format('a configured shard, 0 to %s', count - 1), pin_environment_shard.shard::text);
  END IF;
  SELECT s.shard INTO current_shard FROM environment_shards AS s WHERE s.environment_id = env_id FOR UPDATE;
  IF current_shard IS NULL THEN
    PERFORM raise_error('RO004', format('environment %s not found', quote_nullable(input_prefix(env_id))));
  END IF;
  IF current_shard <> pin_environment_shard.shard AND peer_wired() THEN
    IF current_shard > 0 THEN
      peer := shard_peer(current_shard, 'environment ' || input_prefix(env_id));
    END IF;
    BEGIN
      IF peer IS NULL THEN
        has_runs := EXISTS (SELECT FROM runops_peer.runs AS r WHERE r.environment_id = env_id);
      ELSE
        EXECUTE format('SELECT EXISTS (SELECT FROM %I.runs AS r WHERE r.environment_id = $1)', peer)
        INTO has_runs USING env_id;
      END IF;
    EXCEPTION WHEN connection_exception THEN
      PERFORM raise_error('RO009', format('run-ops shard %s is unavailable: %s', current_shard, SQLERRM));
    END;
    IF has_runs THEN
      PERFORM raise_error('RO003', format('environment %s already has runs on shard %s: it cannot be pinned to '
                                          'another shard', env_id, current_shard));
    END IF;
  END IF;
  UPDATE environment_shards AS s SET shard = pin_environment_shard.shard, pinned = true, assigned_at = pg_catalog.now()
  WHERE s.environment_id = env_id;
  RETURN pin_environment_shard.shard;
END
$$;

-- New work for an environment goes to its shard only: a router or client routing by a stale
-- assignment (an environment pinned after it was cached) gets RO002 naming the owning shard,
-- never a run on the wrong shard, where its keys would not be seen. The control plane and a
-- single run-ops store take any environment. environment_here is the test, inlined by
-- root_admission (the fast path) and require_usable; refuse_other_shards_environment raises.
CREATE OR REPLACE FUNCTION runops.environment_here(environment_id text)
RETURNS TABLE (here boolean)
LANGUAGE sql STABLE
AS $$
  SELECT true FROM runops.store_config AS c
  WHERE runops.local_residency() = 'LEGACY' OR c.shard_count = 1
     OR EXISTS (SELECT FROM runops.environment_shards AS s
                WHERE s.environment_id = environment_here.environment_id AND s.shard = c.shard_number)
$$;

CREATE OR REPLACE FUNCTION runops.refuse_other_shards_environment(environment_id text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  owner integer;
  here integer;
BEGIN
  owner := environment_shard(environment_id);
  here := local_shard();
  IF owner IS NOT NULL AND owner <> here THEN
    PERFORM raise_error('RO002', format('environment %s lives on run-ops shard %s, not on this shard %s',
                                        input_prefix(environment_id), owner, here),
                        'owning_store=RUN_OPS',
                        format('owning_shard=%s: call the router, or that shard', owner));
  END IF;
END
$$;
