-- r0004, issues 10 and 11: the trigger and batch paths rebuilt for speed, one idempotency engine.
-- Each file below is the DDL its part of the change needs on a store with data in place; the
-- function files re-applied after them carry the new bodies.
SELECT 1;
