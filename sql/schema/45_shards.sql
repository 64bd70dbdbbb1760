-- Shards (SPEC §9 [1.3], docs/scale-out.md): the NEW run graph over N run-ops stores.
--
-- store_config, on every store:
--   shard_number     this store's shard: byte 4 of every KSUID it mints, and the only shard
--                    whose ids it writes (0 on the control plane and on a single run-ops store)
--   shard_count      the configured number of run-ops shards (new environments hash over it;
--                    authoritative on the control plane; runops migrate writes it everywhere)
--   shard_ids_since  the first KSUID second whose ids carry their shard: older NEW ids were
--                    minted before shards existed, carry a random byte 4, and live on shard 0
ALTER TABLE runops.store_config
  ADD COLUMN shard_number integer NOT NULL DEFAULT 0 CHECK (shard_number BETWEEN 0 AND 255),
  ADD COLUMN shard_count integer NOT NULL DEFAULT 1 CHECK (shard_count BETWEEN 1 AND 256),
  ADD COLUMN shard_ids_since bigint NOT NULL DEFAULT 0 CHECK (shard_ids_since >= 0);

-- Which shard an environment lives on. Home: the control plane, written when the environment
-- is created (assign_environment_shard); mirrored to every run-ops store with the tenant tables.
-- pinned: an operator chose the shard (pin_environment_shard) rather than the default hash.
CREATE TABLE runops.environment_shards (
  environment_id text COLLATE "C" PRIMARY KEY,
  shard          integer NOT NULL CHECK (shard BETWEEN 0 AND 255),
  pinned         boolean NOT NULL DEFAULT false,
  assigned_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);
ALTER TABLE runops.environment_shards OWNER TO runops_owner;
GRANT SELECT ON runops.environment_shards TO runops_fdw;
