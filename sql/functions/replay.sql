-- Replay (SPEC §9 [1.3]): a new root run from an existing one.
--
-- A replay is an ordinary trigger of the original's environment and task: it goes through
-- admit_new_run, so every admission rule (a usable environment, RO005; the store that mints the
-- environment's roots, RO002; valid options and payload, RO006) and the idempotency engine hold
-- exactly as for trigger_run. What replay adds is where its input comes from: the original, read
-- from whichever store owns it (get_run's read-through), with the caller's overrides on top.

-- What a replay may override; environment_id is a guard, as in the other calls of SPEC §3.
CREATE OR REPLACE FUNCTION runops.replay_option_names()
RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
  SELECT ARRAY['payload', 'tags', 'delay', 'queue', 'max_attempts', 'metadata', 'idempotency_key', 'environment_id']
$$;

-- The trigger options of a replay: the original's tags, queue, max attempts, metadata and
-- concurrency key, then the caller's overrides (a JSON null keeps the original's). Never the
-- original's key: a replay is new work, and a copied key would answer the original itself.
CREATE OR REPLACE FUNCTION runops.replay_trigger_options(original runops.run_view, overrides jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
  SELECT jsonb_strip_nulls(jsonb_build_object('tags', to_jsonb(original.tags), 'queue', original.queue,
                                              'max_attempts', original.max_attempts,
                                              'metadata', original.metadata,
                                              'concurrency_key', original.concurrency_key))
         || coalesce((SELECT jsonb_object_agg(o.key, o.value) FROM jsonb_each(overrides) AS o
                      WHERE o.key NOT IN ('payload', 'environment_id') AND o.value <> 'null'::jsonb),
                     '{}'::jsonb)
$$;

CREATE OR REPLACE FUNCTION runops.replay_run(run_id text, options jsonb DEFAULT '{}')
RETURNS SETOF runops.replayed_run
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  o jsonb := require_object(replay_run.options, 'options');
  original_bare text := require_id(replay_run.run_id, 'run', 'run_id');
  original run_view;
  admitted record;
  answer replayed_run;
BEGIN
  PERFORM reject_unknown_options(o, replay_option_names(), 'replay');
  SELECT * INTO original FROM get_run(replay_run.run_id, option_text(o, 'environment_id', 256));
  IF original.id IS NULL THEN
    PERFORM raise_error('RO004', format('run %s not found', input_prefix(replay_run.run_id)));
  END IF;
  admitted := admit_new_run(original.environment_id, original.task_identifier,
                            coalesce(nullif(o -> 'payload', 'null'::jsonb), original.payload),
                            replay_trigger_options(original, o), NULL, NULL);
  -- A cached answer (the caller's key already names a run) is that run, replay or not.
  IF NOT admitted.is_cached THEN
    UPDATE runs AS r SET replayed_from_run_id = original_bare WHERE r.id = admitted.run_id;
  END IF;
  answer := ROW('run_' || admitted.run_id, admitted.is_cached, admitted.status, admitted.residency);
  RETURN NEXT answer;
END
$$;
