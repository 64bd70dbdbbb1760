-- Applied after every function file: ownership and grants. Applications (runops_app) may EXECUTE
-- the public API and nothing else; internal helpers stay with the owner. The FDW login (runops_fdw) may call what
-- the identity views need.
-- The SECURITY DEFINER functions must run as the NOLOGIN owner, never as the installing superuser.
DO $$
DECLARE
  f regprocedure;
  kind "char";
BEGIN
  FOR f, kind IN SELECT p.oid, p.prokind FROM pg_catalog.pg_proc AS p
           WHERE p.pronamespace = 'runops'::regnamespace
             AND p.proowner <> 'runops_owner'::regrole LOOP
    EXECUTE pg_catalog.format('ALTER %s %s OWNER TO runops_owner',
                              CASE kind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, f);
  END LOOP;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA runops FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA runops FROM PUBLIC;

-- Identity functions are plain (SECURITY INVOKER); their helpers must be callable too.
GRANT EXECUTE ON FUNCTION
  runops.classify_residency(text), runops.try_classify_residency(text), runops.generate_ksuid(),
  runops.generate_cuid(), runops.ksuid_timestamp(text), runops.store_role(), runops.store_identity(),
  runops.now(), runops.ksuid_encode(bytea), runops.base36_digits4(bigint), runops.base36_digits8(bigint),
  runops.base62_digits4(bigint), runops.base62_digits7(bigint), runops.base62_digits10(bigint)
  TO runops_app, runops_fdw;
GRANT EXECUTE ON FUNCTION runops.peer_identity() TO runops_fdw;

GRANT EXECUTE ON FUNCTION
  runops.trigger_run(text, text, jsonb, jsonb),
  runops.trigger_route(text, jsonb),
  runops.reset_idempotency_key(text, text, text, text, text, integer),
  runops.get_run(text, text),
  runops.list_runs(text, integer, text, jsonb),
  runops.list_store_runs(text, integer, text, jsonb),
  runops.purge_runs(text, integer),
  runops.list_environments(text),
  runops.metrics(text),
  runops.finalize_run(text, text, jsonb, jsonb, text),
  runops.create_organization(text, jsonb),
  runops.create_project(text, text),
  runops.create_environment(text, text, text),
  runops.update_environment(text, jsonb),
  runops.split_status(),
  runops.enable_split(),
  runops.disable_split(),
  runops.set_mint_kind(text, text),
  runops.set_default_mint_kind(text),
  runops.pull_tenant_mirror(),
  runops.mirror_status(),
  runops.mirror_fingerprint(),
  runops.dequeue_runs(text, text, integer, jsonb),
  runops.heartbeat_run(text, text, text),
  runops.start_attempt(text, text, text),
  runops.complete_attempt(text, integer, jsonb, text),
  runops.fail_attempt(text, integer, jsonb, timestamptz, text),
  runops.create_checkpoint(text, integer, text, text, jsonb, text),
  runops.resume_run(text, text),
  runops.cancel_run(text, text, text),
  runops.cancel_dev_session_runs(text, text),
  runops.execute_tasks_waiting_for_deploy(text, text[]),
  runops.trigger_failed_task(text, text, jsonb, jsonb, jsonb),
  runops.enqueue_delayed_runs(integer),
  runops.expire_enqueued_runs(integer),
  runops.tick(integer),
  runops.create_waitpoint(text, text, jsonb),
  runops.block_run(text, text[], jsonb, text),
  runops.complete_waitpoint(text, jsonb, boolean, text),
  runops.get_waitpoint(text, text),
  runops.batch_trigger(text, jsonb, jsonb),
  runops.create_batch(text, integer, jsonb),
  runops.append_batch_items(text, integer, jsonb, text),
  runops.seal_batch(text, text),
  runops.get_batch(text, text),
  runops.resume_batch_run(text, text)
  TO runops_app;
GRANT EXECUTE ON PROCEDURE runops.tick_every(integer, integer, integer) TO runops_app;

-- Shards (shards.sql): shard_of is an identity function (plain, like classify_residency); the
-- assignment is read by the app and the FDW login, pinned by operators on the control plane.
GRANT EXECUTE ON FUNCTION runops.shard_of(text), runops.shard_of_id(text, integer), runops.base62_digit(text),
  runops.ksuid_top40(text), runops.shard_of_top40(bigint, integer)
  TO runops_app, runops_fdw;
GRANT EXECUTE ON FUNCTION runops.environment_shard(text), runops.pin_environment_shard(text, integer)
  TO runops_app;
