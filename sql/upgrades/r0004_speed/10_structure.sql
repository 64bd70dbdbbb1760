-- r0004, issue 10: one home per rule. The range checks require_max_rows (tick.sql) and
-- require_attempt_number (lifecycle.sql) are now require_between (bounded_input.sql); the
-- function files re-applied after this one call it instead.
DROP FUNCTION runops.require_max_rows(integer, text);
DROP FUNCTION runops.require_attempt_number(integer);
