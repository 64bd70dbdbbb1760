-- Applied after every function file: ownership and grants. Services (members of runops_api) may
-- EXECUTE the public API and nothing else; internal helpers stay with the owner. The FDW login
-- (runops_fdw) may call what the identity views need. docs/security.md lists every role's rights.
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
  runops.base62_digits4(bigint), runops.base62_digits7(bigint), runops.base62_digits10(bigint),
  runops.input_prefix(text)
  TO runops_fdw, runops_api;  -- in this order, as an upgraded store's ACLs hold them (pg_dump compares)
GRANT EXECUTE ON FUNCTION runops.peer_identity() TO runops_fdw;

GRANT EXECUTE ON FUNCTION
  runops.store_version(),
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
  runops.replay_run(text, jsonb),
  runops.enqueue_delayed_runs(integer),
  runops.expire_enqueued_runs(integer),
  runops.tick(integer),
  runops.tick_when_due(integer, integer),
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
  TO runops_api;
GRANT EXECUTE ON PROCEDURE runops.tick_every(integer, integer, integer) TO runops_api;
-- Bulk actions (sql/functions/bulk_actions.sql).
GRANT EXECUTE ON FUNCTION runops.create_bulk_action(text, text, jsonb, jsonb), runops.get_bulk_action(text, text),
  runops.abort_bulk_action(text), runops.advance_bulk_actions(integer)
  TO runops_api;

-- Large objects, and WAL messages (pg_logical_emit_message), are storage outside every runops
-- limit (SPEC §3 [1.2]) that no service needs, yet PostgreSQL lets PUBLIC write them. A grant to
-- PUBLIC cannot be taken back from one role only, so the first time this runs in a database: revoke
-- those functions from PUBLIC and grant them back to every role that had them through PUBLIC and
-- is not a runops role or a service (a member of runops_api or runops_fdw) — another application
-- sharing the database keeps them. A role created later that needs them is granted them by its
-- DBA (docs/security.md). Later runs change nothing: PUBLIC no longer holds them.
DO $$
DECLARE
  unbounded_writes text;
  keeps text;
BEGIN
  SELECT pg_catalog.string_agg(p.oid::regprocedure::text, ', ') INTO unbounded_writes
  FROM pg_catalog.pg_proc AS p
  WHERE p.pronamespace = 'pg_catalog'::regnamespace
    AND (p.proname LIKE 'lo\_%' OR p.proname IN ('loread', 'lowrite', 'pg_logical_emit_message'))
    AND EXISTS (SELECT FROM pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) AS a
                WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE');
  IF unbounded_writes IS NULL THEN
    RETURN;
  END IF;
  IF pg_catalog.current_setting('is_superuser') <> 'on' THEN
    -- They belong to the bootstrap superuser: anyone else's REVOKE would only warn.
    RAISE WARNING 'large objects and pg_logical_emit_message stay executable by PUBLIC: run runops migrate as a superuser to revoke them from services';
    RETURN;
  END IF;
  SELECT pg_catalog.string_agg(pg_catalog.quote_ident(r.rolname), ', ') INTO keeps
  FROM pg_catalog.pg_roles AS r
  WHERE r.rolname !~ '^(pg_|runops_)' AND NOT r.rolsuper
    AND NOT pg_catalog.pg_has_role(r.oid, 'runops_api', 'MEMBER')
    AND NOT pg_catalog.pg_has_role(r.oid, 'runops_fdw', 'MEMBER');
  EXECUTE 'REVOKE EXECUTE ON FUNCTION ' || unbounded_writes || ' FROM PUBLIC';
  IF keeps IS NOT NULL THEN
    EXECUTE 'GRANT EXECUTE ON FUNCTION ' || unbounded_writes || ' TO ' || keeps;
  END IF;
END
$$;

-- Shards (shards.sql): shard_of is an identity function (plain, like classify_residency); the
-- assignment is read by services and the FDW login, pinned by operators on the control plane.
GRANT EXECUTE ON FUNCTION runops.shard_of(text), runops.shard_of_id(text, integer), runops.base62_digit(text),
  runops.ksuid_top40(text), runops.shard_of_top40(bigint, integer)
  TO runops_fdw, runops_api;
GRANT EXECUTE ON FUNCTION runops.environment_shard(text), runops.pin_environment_shard(text, integer),
  runops.shard_config()
  TO runops_api;

-- Alerts (alerts.sql): channels on the control plane, the deliverers' calls on every store.
GRANT EXECUTE ON FUNCTION runops.create_alert_channel(text, text, text, jsonb), runops.delete_alert_channel(text),
  runops.claim_alerts(text, integer, jsonb), runops.complete_alert(text, text), runops.fail_alert(text, text, text)
  TO runops_api;
