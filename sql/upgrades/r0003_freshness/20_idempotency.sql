-- r0003: one release of run keys. release_idempotency_keys (sql/functions/idempotency.sql)
-- replaces release_dead_key, whose callers (create_run, claim_idempotency_key) the function files
-- re-applied at head now call the new function.
--
-- Adjusted since its release: DROP FUNCTION ... IF EXISTS (an upgrade from an empty database
-- installs no function before head, so there is nothing to drop; a store installed by an
-- earlier release has it).
DROP FUNCTION IF EXISTS runops.release_dead_key(text, text);
