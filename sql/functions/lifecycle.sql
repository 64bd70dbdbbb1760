-- Lifecycle: every status change is checked against runops.status_transitions by one trigger,
-- which also sends the change to listeners. Functions set runops.transition_by (transaction
-- local) to say which move they make; a direct UPDATE without it may make any move the table
-- allows, and none it does not.

CREATE OR REPLACE FUNCTION runops.is_final_status(status text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT status IN ('CANCELED', 'INTERRUPTED', 'COMPLETED_SUCCESSFULLY', 'COMPLETED_WITH_ERRORS',
                    'SYSTEM_FAILURE', 'CRASHED', 'EXPIRED', 'TIMED_OUT')
$$;

CREATE OR REPLACE FUNCTION runops.guard_run_status()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  mover text := nullif(current_setting('runops.transition_by', true), '');
BEGIN
  IF NOT EXISTS (SELECT FROM status_transitions AS t
                 WHERE t.from_status = OLD.status AND t.to_status = NEW.status
                   AND (mover IS NULL OR t.made_by = mover)) THEN
    PERFORM raise_error('RO003',
      format('run run_%s cannot move from %s to %s%s', OLD.id, OLD.status, NEW.status,
             CASE WHEN mover IS NULL THEN '' ELSE ' by ' || mover END),
      NULL, CASE WHEN is_final_status(OLD.status) THEN 'a final run never changes again' END);
  END IF;
  -- Committed with the change, so a listener never hears of a status that was rolled back.
  IF (SELECT e.notifications FROM runtime_environments AS e WHERE e.id = NEW.environment_id) IS DISTINCT FROM false THEN
    PERFORM pg_notify('runops_env_' || NEW.environment_id,
                      json_build_object('run_id', 'run_' || NEW.id, 'old_status', OLD.status,
                                        'new_status', NEW.status, 'at', NEW.updated_at)::text);
  END IF;
  RETURN NEW;
END
$$;

-- The one row-level entry to a per-run write: RO006/RO001 for a bad id, RO002 for another
-- store's run, RO004 when it is missing. Locks the run.
CREATE OR REPLACE FUNCTION runops.lock_run(run_id text)
RETURNS runops.runs
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  bare text := require_id(run_id, 'run', 'run_id');
  residency text := classify_residency(bare);
  r runs;
BEGIN
  IF residency <> local_residency() THEN
    IF residency = 'NEW' AND NOT (current_split_settings()).ever_enabled THEN
      PERFORM raise_error('RO004', format('run %s not found (the split was never enabled)', run_id));
    END IF;
    PERFORM raise_wrong_store('run', run_id, store_for_residency(residency));
  END IF;
  SELECT * INTO r FROM runs AS x WHERE x.id = bare FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('run %s not found', run_id));
  END IF;
  RETURN r;
END
$$;

CREATE OR REPLACE FUNCTION runops.finalize_run(run_id text, status text, error jsonb DEFAULT NULL,
                                               output jsonb DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs;
  final_status text := finalize_run.status;
BEGIN
  IF final_status IS NULL OR NOT is_final_status(final_status) THEN
    PERFORM raise_error('RO006', format('finalize_run needs a final status (CANCELED, INTERRUPTED, COMPLETED_SUCCESSFULLY, '
                                        'COMPLETED_WITH_ERRORS, SYSTEM_FAILURE, CRASHED, EXPIRED, TIMED_OUT), got %s',
                                        quote_nullable(final_status)));
  END IF;
  r := lock_run(finalize_run.run_id);
  -- Repeating the call that made the run final returns it unchanged.
  IF r.status = final_status THEN
    RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
    RETURN;
  END IF;
  PERFORM set_config('runops.transition_by', 'finalize_run', true);
  -- One write: status, error and output land together, so no reader sees a final run without them.
  UPDATE runs AS x
  SET status = final_status,
      error = coalesce(finalize_run.error, x.error),
      output = coalesce(finalize_run.output, x.output),
      completed_at = now(),
      expired_at = CASE WHEN final_status = 'EXPIRED' THEN now() ELSE x.expired_at END,
      locked_by = NULL,
      lease_expires_at = NULL,
      updated_at = now()
  WHERE x.id = r.id;
  PERFORM set_config('runops.transition_by', '', true);
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;
