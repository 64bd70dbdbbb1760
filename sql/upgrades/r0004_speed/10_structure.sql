-- r0004: one home per rule. The range checks require_max_rows (tick.sql) and
-- require_attempt_number (lifecycle.sql) are now require_between (bounded_input.sql); the
-- function files re-applied at head call it instead.
--
-- Adjusted since its release: DROP FUNCTION ... IF EXISTS (an upgrade from an empty database
-- installs no function before head, so there is nothing to drop; a store installed by an
-- earlier release has it).
DROP FUNCTION IF EXISTS runops.require_max_rows(integer, text);
DROP FUNCTION IF EXISTS runops.require_attempt_number(integer);
