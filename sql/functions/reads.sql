-- Read-through: a read answers from the store that owns the id — locally, or through the FDW —
-- and never refuses: a missing, foreign-tenant, malformed or unroutable id is simply no row.
-- Only an unreachable other store is an error (RO009).

-- Where a read of a bare id goes: its residency when this store holds it or the wired peer may
-- (a NEW id only once the split was ever enabled); NULL — no row, no one asked — for a malformed
-- id, an unwired peer, or a NEW id before any split. The one routing rule of get_run,
-- find_waitpoint and get_batch.
CREATE OR REPLACE FUNCTION runops.read_residency(bare text)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  residency text := try_classify_bare(bare);
BEGIN
  IF residency = local_residency() THEN
    RETURN residency;
  END IF;
  IF residency IS NULL OR NOT peer_wired() OR (residency = 'NEW' AND NOT (current_split_settings()).ever_enabled) THEN
    RETURN NULL;
  END IF;
  RETURN residency;
END
$$;

CREATE OR REPLACE FUNCTION runops.get_run(run_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := bare_id(get_run.run_id, 'run');
  residency text := read_residency(bare);
  env_id text := get_run.environment_id;
  cfg record;
  shard integer;
  peer text;
BEGIN
  IF residency = local_residency() THEN
    RETURN QUERY SELECT * FROM run_view AS v
                 WHERE v.id = bare AND (env_id IS NULL OR v.environment_id = env_id);
    RETURN;
  ELSIF residency IS NULL THEN
    RETURN;
  ELSIF residency = 'NEW' THEN
    -- The control plane over several run-ops shards reads a NEW id on the shard it names (shard 0
    -- below, through runops_peer; shard k through runops_peer_<k>); an id of no shard of this
    -- deployment is no row, a shard not wired here RO009 (docs/scale-out.md). The id is decoded
    -- outside the query: an immutable call on a parameter would keep the query on custom plans,
    -- planned again on every call.
    SELECT c.shard_count, c.shard_ids_since INTO cfg FROM store_config AS c;
    IF cfg.shard_count > 1 THEN
      shard := shard_of_id(bare, cfg.shard_ids_since::integer);
      IF shard >= cfg.shard_count THEN
        RETURN;
      ELSIF shard > 0 THEN
        peer := shard_peer(shard, 'run ' || input_prefix(get_run.run_id));
      END IF;
    END IF;
  END IF;
  BEGIN
    -- Two plain predicates, so postgres_fdw ships both and the remote uses its primary key.
    IF peer IS NOT NULL THEN
      RETURN QUERY EXECUTE format('SELECT * FROM %I.run_view AS v WHERE v.id = $1', peer)
                           || CASE WHEN env_id IS NULL THEN '' ELSE ' AND v.environment_id = $2' END
                   USING bare, env_id;
    ELSIF env_id IS NULL THEN
      RETURN QUERY SELECT * FROM runops_peer.run_view AS v WHERE v.id = bare;
    ELSE
      RETURN QUERY SELECT * FROM runops_peer.run_view AS v WHERE v.id = bare AND v.environment_id = env_id;
    END IF;
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', format('the %s store that owns %s is unavailable: %s',
                                        store_for_residency(residency), get_run.run_id, SQLERRM));
  END;
END
$$;
