-- r0004: ids are bare inside SQL. Three internal functions now answer bare ids where
-- they answered friendly ones, so they carry new names: a function that keeps its name and
-- signature but changes its answer would be picked up by a call already running the previous
-- revision's caller when this upgrade commits (PostgreSQL takes no lock on a function), and that
-- caller would hand a bare id to its client. With the old names dropped, such a call fails
-- instead (undefined function), and nothing it did is kept.
--   create_run           -> find_or_create_run  (sql/functions/idempotency.sql)
--   admit_run            -> admit_new_run       (sql/functions/trigger_run.sql)
--   complete_local_edges -> resume_local_waiters (sql/functions/waitpoints.sql)
--
-- Adjusted since its release: DROP FUNCTION ... IF EXISTS (an upgrade from an empty database
-- installs no function before head, so there is nothing to drop; a store installed by an
-- earlier release has it).
DROP FUNCTION IF EXISTS runops.create_run(runops.environment_context, runops.runs, text, jsonb, runops.trigger_spec, text, jsonb);
DROP FUNCTION IF EXISTS runops.admit_run(text, text, jsonb, jsonb, text, jsonb);
DROP FUNCTION IF EXISTS runops.complete_local_edges(text);
