-- r0003, issue 10: one release of run keys. release_idempotency_keys (sql/functions/idempotency.sql)
-- replaces release_dead_key, whose callers (create_run, claim_idempotency_key) the function files
-- re-applied after this one now call the new function.
DROP FUNCTION runops.release_dead_key(text, text);
