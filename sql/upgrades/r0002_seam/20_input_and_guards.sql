-- r0002, bounded input and the environment guard (SPEC §3 [1.2]).
--
-- Adjusted since its release: DROP FUNCTION ... IF EXISTS (an upgrade from an empty database
-- installs no function before head; a store installed by the r0001 release has them).
--
-- The JSON limits are per store: an operator changes them with UPDATE runops.store_config.
ALTER TABLE runops.store_config
  ADD COLUMN max_json_bytes integer NOT NULL DEFAULT 3145728 CHECK (max_json_bytes BETWEEN 65536 AND 268435455);
ALTER TABLE runops.store_config
  ADD COLUMN max_json_depth integer NOT NULL DEFAULT 64 CHECK (max_json_depth BETWEEN 32 AND 512);

-- Every write naming a row by id gains a trailing `environment_id text DEFAULT NULL`. A new
-- signature is a new function, so the old ones go first (the function files re-applied
-- at head recreate them, and after_functions.sql grants the new ones). Calls that pass the old
-- arguments resolve to the new functions through the default.
DROP FUNCTION IF EXISTS runops.heartbeat_run(text, text);
DROP FUNCTION IF EXISTS runops.start_attempt(text, text);
DROP FUNCTION IF EXISTS runops.complete_attempt(text, integer, jsonb);
DROP FUNCTION IF EXISTS runops.fail_attempt(text, integer, jsonb, timestamptz);
DROP FUNCTION IF EXISTS runops.create_checkpoint(text, integer, text, text, jsonb);
DROP FUNCTION IF EXISTS runops.resume_run(text);
DROP FUNCTION IF EXISTS runops.finalize_run(text, text, jsonb, jsonb);
DROP FUNCTION IF EXISTS runops.cancel_run(text, text);
DROP FUNCTION IF EXISTS runops.block_run(text, text[], jsonb);
DROP FUNCTION IF EXISTS runops.complete_waitpoint(text, jsonb, boolean);
DROP FUNCTION IF EXISTS runops.append_batch_items(text, integer, jsonb);
DROP FUNCTION IF EXISTS runops.seal_batch(text);
DROP FUNCTION IF EXISTS runops.resume_batch_run(text);
-- Internal: lock_run takes the guard too.
DROP FUNCTION IF EXISTS runops.lock_run(text);
