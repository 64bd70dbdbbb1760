-- r0004, issue 10: one implementation per rule (the duplicates pass). Functions folded into one
-- helper each are dropped here; the function files re-applied after this carry their callers.
--   require_lease  -> lock_leased_run (lifecycle.sql): the opening of heartbeat_run and start_attempt
DROP FUNCTION runops.require_lease(runops.runs, text, text);
