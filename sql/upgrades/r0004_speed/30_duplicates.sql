-- r0004: one implementation per rule (the duplicates pass). Functions folded into one
-- helper each are dropped here; the function files re-applied at head carry their callers.
--   require_lease  -> lock_leased_run (lifecycle.sql): the opening of heartbeat_run and start_attempt
--
-- Adjusted since its release: DROP FUNCTION ... IF EXISTS (an upgrade from an empty database
-- installs no function before head, so there is nothing to drop; a store installed by an
-- earlier release has it).
DROP FUNCTION IF EXISTS runops.require_lease(runops.runs, text, text);
