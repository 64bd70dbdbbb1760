-- Shards (SPEC §9 [1.3], docs/scale-out.md): the store's shard number, the shard count, the first
-- KSUID second whose ids carry their shard, and the environment -> shard assignment.
--
-- lock: runops.store_config, runops.runtime_environments
ALTER TABLE runops.store_config
  ADD COLUMN shard_number integer NOT NULL DEFAULT 0 CHECK (shard_number BETWEEN 0 AND 255),
  ADD COLUMN shard_count integer NOT NULL DEFAULT 1 CHECK (shard_count BETWEEN 1 AND 256),
  ADD COLUMN shard_ids_since bigint NOT NULL DEFAULT 0 CHECK (shard_ids_since >= 0);

-- A store that already holds run-graph rows minted them with a random byte 4: they all live on
-- this store, shard 0, and ids name their shard only from the next second on (runops migrate
-- copies this value to every shard added later). An empty store needs no cut-over.
UPDATE runops.store_config
SET shard_ids_since = pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()))::bigint
                      - 1400000000 + 1
WHERE EXISTS (SELECT FROM runops.runs) OR EXISTS (SELECT FROM runops.batches)
   OR EXISTS (SELECT FROM runops.waitpoints);

CREATE TABLE runops.environment_shards (
  environment_id text COLLATE "C" PRIMARY KEY,
  shard          integer NOT NULL CHECK (shard BETWEEN 0 AND 255),
  pinned         boolean NOT NULL DEFAULT false,
  assigned_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);
ALTER TABLE runops.environment_shards OWNER TO runops_owner;
GRANT SELECT ON runops.environment_shards TO runops_fdw;

-- Every environment that exists lives on the one run-ops store there was: shard 0. Both stores
-- seed the rows (the run-ops store from its mirror), so the mirror's subscription takes the new
-- table without a copy.
INSERT INTO runops.environment_shards (environment_id, shard)
SELECT e.id, 0 FROM runops.runtime_environments AS e;
