-- The public SQL API as the catalog shows it (SPEC §3, §4, §5), identical in both stores:
-- every public function that exists today, its return type, SECURITY DEFINER or not, its pinned
-- search_path, its owner, and who may execute it.
BEGIN;
SET LOCAL search_path = tap, public;
SELECT plan(111);

-- Identity functions: plain functions, never SECURITY DEFINER (SPEC §4 "Identity").
SELECT has_function('runops', 'classify_residency', ARRAY['text'], 'classify_residency(text) exists');
SELECT has_function('runops', 'try_classify_residency', ARRAY['text'], 'try_classify_residency(text) exists');
SELECT has_function('runops', 'generate_ksuid', ARRAY[]::text[], 'generate_ksuid() exists');
SELECT has_function('runops', 'generate_cuid', ARRAY[]::text[], 'generate_cuid() exists');
SELECT has_function('runops', 'ksuid_timestamp', ARRAY['text'], 'ksuid_timestamp(text) exists');
SELECT has_function('runops', 'store_role', ARRAY[]::text[], 'store_role() exists');
SELECT has_function('runops', 'store_identity', ARRAY[]::text[], 'store_identity() exists');

SELECT function_returns('runops', 'classify_residency', ARRAY['text'], 'text');
SELECT function_returns('runops', 'try_classify_residency', ARRAY['text'], 'text');
SELECT function_returns('runops', 'generate_ksuid', ARRAY[]::text[], 'text');
SELECT function_returns('runops', 'generate_cuid', ARRAY[]::text[], 'text');
SELECT function_returns('runops', 'ksuid_timestamp', ARRAY['text'], 'timestamp with time zone');
SELECT function_returns('runops', 'store_role', ARRAY[]::text[], 'text');
SELECT function_returns('runops', 'store_identity', ARRAY[]::text[], 'setof record');
SELECT is(pg_catalog.pg_get_function_arguments('runops.store_identity()'::regprocedure),
          'OUT system_identifier text, OUT database_name text, OUT database_oid bigint, OUT store_role text, OUT server_version text',
          'store_identity() returns (system_identifier, database_name, database_oid, store_role, server_version)');

SELECT isnt_definer('runops', 'classify_residency', ARRAY['text'], 'classify_residency is not SECURITY DEFINER');
SELECT isnt_definer('runops', 'try_classify_residency', ARRAY['text'], 'try_classify_residency is not SECURITY DEFINER');
SELECT isnt_definer('runops', 'generate_ksuid', ARRAY[]::text[], 'generate_ksuid is not SECURITY DEFINER');
SELECT isnt_definer('runops', 'generate_cuid', ARRAY[]::text[], 'generate_cuid is not SECURITY DEFINER');
SELECT isnt_definer('runops', 'ksuid_timestamp', ARRAY['text'], 'ksuid_timestamp is not SECURITY DEFINER');
SELECT isnt_definer('runops', 'store_role', ARRAY[]::text[], 'store_role is not SECURITY DEFINER');
SELECT isnt_definer('runops', 'store_identity', ARRAY[]::text[], 'store_identity is not SECURITY DEFINER');

SELECT volatility_is('runops', 'classify_residency', ARRAY['text'], 'immutable', 'classify_residency is IMMUTABLE');
SELECT volatility_is('runops', 'try_classify_residency', ARRAY['text'], 'immutable', 'try_classify_residency is IMMUTABLE');
SELECT volatility_is('runops', 'generate_ksuid', ARRAY[]::text[], 'volatile', 'generate_ksuid is VOLATILE');
SELECT volatility_is('runops', 'generate_cuid', ARRAY[]::text[], 'volatile', 'generate_cuid is VOLATILE');

-- Public functions other than the identity functions (SPEC §4), as far as they exist today.
SELECT has_function('runops', 'trigger_run', ARRAY['text', 'text', 'jsonb', 'jsonb'], 'trigger_run(text, text, jsonb, jsonb) exists');
SELECT has_function('runops', 'trigger_route', ARRAY['text', 'jsonb'], 'trigger_route(text, jsonb) exists');
SELECT has_function('runops', 'reset_idempotency_key', ARRAY['text', 'text', 'text', 'text', 'text', 'integer'],
                    'reset_idempotency_key(text, text, text, text, text, integer) exists');
SELECT has_function('runops', 'get_run', ARRAY['text', 'text'], 'get_run(text, text) exists');
SELECT has_function('runops', 'finalize_run', ARRAY['text', 'text', 'jsonb', 'jsonb', 'text'], 'finalize_run(text, text, jsonb, jsonb, text) exists');
SELECT has_function('runops', 'create_organization', ARRAY['text', 'jsonb'], 'create_organization(text, jsonb) exists');
SELECT has_function('runops', 'create_project', ARRAY['text', 'text'], 'create_project(text, text) exists');
SELECT has_function('runops', 'create_environment', ARRAY['text', 'text', 'text'], 'create_environment(text, text, text) exists');
SELECT has_function('runops', 'update_environment', ARRAY['text', 'jsonb'], 'update_environment(text, jsonb) exists');
SELECT has_function('runops', 'split_status', ARRAY[]::text[], 'split_status() exists');
SELECT has_function('runops', 'enable_split', ARRAY[]::text[], 'enable_split() exists');
SELECT has_function('runops', 'disable_split', ARRAY[]::text[], 'disable_split() exists');
SELECT has_function('runops', 'set_mint_kind', ARRAY['text', 'text'], 'set_mint_kind(text, text) exists');
SELECT has_function('runops', 'set_default_mint_kind', ARRAY['text'], 'set_default_mint_kind(text) exists');

SELECT function_returns('runops', 'trigger_run', ARRAY['text', 'text', 'jsonb', 'jsonb'], 'setof record');
SELECT is(pg_catalog.pg_get_function_result('runops.trigger_run(text, text, jsonb, jsonb)'::regprocedure),
          'TABLE(run_id text, is_cached boolean, status text, residency text)',
          'trigger_run returns TABLE(run_id, is_cached, status, residency)');
SELECT function_returns('runops', 'trigger_route', ARRAY['text', 'jsonb'], 'text');
SELECT function_returns('runops', 'reset_idempotency_key', ARRAY['text', 'text', 'text', 'text', 'text', 'integer'], 'integer');
SELECT function_returns('runops', 'get_run', ARRAY['text', 'text'], 'setof runops.run_view');
SELECT function_returns('runops', 'finalize_run', ARRAY['text', 'text', 'jsonb', 'jsonb', 'text'], 'setof runops.run_view');
SELECT function_returns('runops', 'create_organization', ARRAY['text', 'jsonb'], 'text');
SELECT function_returns('runops', 'create_project', ARRAY['text', 'text'], 'text');
SELECT function_returns('runops', 'create_environment', ARRAY['text', 'text', 'text'], 'text');
SELECT function_returns('runops', 'update_environment', ARRAY['text', 'jsonb'], 'void');
SELECT function_returns('runops', 'split_status', ARRAY[]::text[], 'jsonb');
SELECT function_returns('runops', 'enable_split', ARRAY[]::text[], 'jsonb');
SELECT function_returns('runops', 'disable_split', ARRAY[]::text[], 'jsonb');
SELECT function_returns('runops', 'set_mint_kind', ARRAY['text', 'text'], 'void');
SELECT function_returns('runops', 'set_default_mint_kind', ARRAY['text'], 'void');

SELECT is_definer('runops', 'trigger_run', ARRAY['text', 'text', 'jsonb', 'jsonb'], 'trigger_run is SECURITY DEFINER');
SELECT is_definer('runops', 'trigger_route', ARRAY['text', 'jsonb'], 'trigger_route is SECURITY DEFINER');
SELECT is_definer('runops', 'reset_idempotency_key', ARRAY['text', 'text', 'text', 'text', 'text', 'integer'],
                  'reset_idempotency_key is SECURITY DEFINER');
SELECT is_definer('runops', 'get_run', ARRAY['text', 'text'], 'get_run is SECURITY DEFINER');
SELECT is_definer('runops', 'finalize_run', ARRAY['text', 'text', 'jsonb', 'jsonb', 'text'], 'finalize_run is SECURITY DEFINER');
SELECT is_definer('runops', 'create_organization', ARRAY['text', 'jsonb'], 'create_organization is SECURITY DEFINER');
SELECT is_definer('runops', 'create_project', ARRAY['text', 'text'], 'create_project is SECURITY DEFINER');
SELECT is_definer('runops', 'create_environment', ARRAY['text', 'text', 'text'], 'create_environment is SECURITY DEFINER');
SELECT is_definer('runops', 'update_environment', ARRAY['text', 'jsonb'], 'update_environment is SECURITY DEFINER');
SELECT is_definer('runops', 'split_status', ARRAY[]::text[], 'split_status is SECURITY DEFINER');
SELECT is_definer('runops', 'enable_split', ARRAY[]::text[], 'enable_split is SECURITY DEFINER');
SELECT is_definer('runops', 'disable_split', ARRAY[]::text[], 'disable_split is SECURITY DEFINER');
SELECT is_definer('runops', 'set_mint_kind', ARRAY['text', 'text'], 'set_mint_kind is SECURITY DEFINER');
SELECT is_definer('runops', 'set_default_mint_kind', ARRAY['text'], 'set_default_mint_kind is SECURITY DEFINER');

-- SPEC §5: every SECURITY DEFINER function pins its search path.
SELECT is_empty($$
  SELECT p.oid::regprocedure::text
  FROM pg_catalog.pg_proc AS p
  WHERE p.pronamespace = 'runops'::regnamespace AND p.prosecdef
    AND p.proconfig IS DISTINCT FROM ARRAY['search_path=runops, pg_catalog, pg_temp']
$$, 'every SECURITY DEFINER function in runops has SET search_path = runops, pg_catalog, pg_temp');

-- SPEC §5: owned by a NOLOGIN non-superuser owner role.
SELECT function_owner_is('runops', 'trigger_run', ARRAY['text', 'text', 'jsonb', 'jsonb'], 'runops_owner');
SELECT function_owner_is('runops', 'finalize_run', ARRAY['text', 'text', 'jsonb', 'jsonb', 'text'], 'runops_owner');
SELECT is_empty($$
  SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc AS p
  WHERE p.pronamespace = 'runops'::regnamespace AND p.proowner <> 'runops_owner'::regrole
$$, 'every runops function is owned by runops_owner');
SELECT isnt_superuser('runops_owner');
SELECT ok(NOT r.rolcanlogin, 'runops_owner is NOLOGIN') FROM pg_catalog.pg_roles AS r WHERE r.rolname = 'runops_owner';

-- SPEC §5: the app role may EXECUTE the public functions; PUBLIC may execute nothing.
SELECT function_privs_are('runops', 'classify_residency', ARRAY['text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'try_classify_residency', ARRAY['text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'generate_ksuid', ARRAY[]::text[], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'generate_cuid', ARRAY[]::text[], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'ksuid_timestamp', ARRAY['text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'store_role', ARRAY[]::text[], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'store_identity', ARRAY[]::text[], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'trigger_run', ARRAY['text', 'text', 'jsonb', 'jsonb'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'trigger_route', ARRAY['text', 'jsonb'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'reset_idempotency_key', ARRAY['text', 'text', 'text', 'text', 'text', 'integer'],
                          'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'get_run', ARRAY['text', 'text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'finalize_run', ARRAY['text', 'text', 'jsonb', 'jsonb', 'text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'create_organization', ARRAY['text', 'jsonb'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'create_project', ARRAY['text', 'text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'create_environment', ARRAY['text', 'text', 'text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'update_environment', ARRAY['text', 'jsonb'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'split_status', ARRAY[]::text[], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'enable_split', ARRAY[]::text[], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'disable_split', ARRAY[]::text[], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'set_mint_kind', ARRAY['text', 'text'], 'runops_app', ARRAY['EXECUTE']);
SELECT function_privs_are('runops', 'set_default_mint_kind', ARRAY['text'], 'runops_app', ARRAY['EXECUTE']);

SELECT is_empty($$
  SELECT p.oid::regprocedure::text
  FROM pg_catalog.pg_proc AS p,
       LATERAL pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) AS a
  WHERE p.pronamespace = 'runops'::regnamespace AND a.grantee = 0
$$, 'PUBLIC may execute no runops function');

-- The app role may execute nothing but the public API (every name SPEC §4 lists, so functions
-- added later stay covered) and the helpers the identity functions and operator commands need.
SELECT is_empty($$
  SELECT p.oid::regprocedure::text
  FROM pg_catalog.pg_proc AS p
  WHERE p.pronamespace = 'runops'::regnamespace
    AND pg_catalog.has_function_privilege('runops_app', p.oid, 'EXECUTE')
    AND p.proname <> ALL (ARRAY[
      -- SPEC §4
      'classify_residency', 'try_classify_residency', 'generate_ksuid', 'generate_cuid', 'ksuid_timestamp',
      'store_role', 'store_identity', 'trigger_run', 'reset_idempotency_key', 'get_run', 'get_batch',
      'get_waitpoint', 'list_runs', 'trigger_route', 'batch_trigger', 'create_batch', 'append_batch_items',
      'seal_batch', 'dequeue_runs', 'heartbeat_run', 'start_attempt', 'complete_attempt', 'fail_attempt',
      'create_checkpoint', 'resume_run', 'finalize_run', 'cancel_run', 'cancel_dev_session_runs',
      'execute_tasks_waiting_for_deploy', 'trigger_failed_task', 'resume_batch_run', 'enqueue_delayed_runs',
      'expire_enqueued_runs', 'tick', 'purge_runs', 'create_waitpoint', 'block_run', 'complete_waitpoint',
      'create_organization', 'create_project', 'create_environment', 'update_environment', 'split_status',
      'enable_split', 'disable_split', 'set_mint_kind', 'set_default_mint_kind',
      -- SPEC §9 [1.3] shards: shard_of, and the environment assignment (docs/scale-out.md)
      'shard_of', 'environment_shard', 'pin_environment_shard', 'shard_of_id', 'base62_digit', 'ksuid_top40',
      'shard_of_top40', 'shard_config',
      -- SPEC §9 [1.3] replay
      'replay_run',
      -- SPEC §9 [1.3] bulk actions, and the processor tick and workers call (sql/functions/bulk_actions.sql)
      'create_bulk_action', 'get_bulk_action', 'abort_bulk_action', 'advance_bulk_actions',
      -- SPEC §9 [1.3] alerts
      'create_alert_channel', 'delete_alert_channel', 'claim_alerts', 'complete_alert', 'fail_alert',
      -- helpers granted on purpose (sql/after_functions.sql)
      'now', 'ksuid_encode', 'base36_digits4', 'base36_digits8', 'base62_digits4', 'base62_digits7',
      'base62_digits10', 'input_prefix',
      'pull_tenant_mirror', 'mirror_fingerprint',
      'list_store_runs',  -- one store's list_runs page, for the client's own merge (docs/listing.md)
      'list_environments',  -- `runops env list` (control plane)
      'metrics',  -- SPEC §4 [1.2]: `runops metrics` and its Prometheus endpoint
      'mirror_status',  -- SPEC §4 [1.2] freshness bound: `runops doctor` and metrics
      'store_version',  -- the store's revision, which clients check (docs/decisions.md)
      'tick_when_due',  -- the worker's ticker: one pass per interval, whoever runs it (docs/worker.md)
      'tick_every'])  -- tick_every: the pg_cron entry point (docs/pg_cron.md)
$$, 'runops_app may execute only the public API and its granted helpers');

SELECT ok(NOT pg_catalog.has_function_privilege('runops_app', 'runops.find_or_create_run(runops.environment_context, runops.runs, text, jsonb, runops.trigger_spec, text, jsonb)', 'EXECUTE'),
          'runops_app may not execute the internal find_or_create_run');
SELECT ok(NOT pg_catalog.has_table_privilege('runops_app', 'runops.runs', 'SELECT'),
          'runops_app may not read runops.runs directly');
SELECT ok(NOT pg_catalog.has_table_privilege('runops_app', 'runops.runs', 'INSERT'),
          'runops_app may not write runops.runs directly');

-- SPEC §3: public argument types are only text, jsonb, integer, boolean, timestamptz (and the
-- text[] that SPEC §4 itself gives block_run and execute_tasks_waiting_for_deploy).
SELECT is_empty($$
  SELECT p.oid::regprocedure::text
  FROM pg_catalog.pg_proc AS p
  WHERE p.pronamespace = 'runops'::regnamespace
    AND pg_catalog.has_function_privilege('runops_app', p.oid, 'EXECUTE')
    AND p.proname NOT IN ('ksuid_encode', 'base36_digits4', 'base36_digits8', 'base62_digits4', 'base62_digits7',
                          'base62_digits10', 'shard_of_top40')
    AND EXISTS (SELECT FROM pg_catalog.unnest(p.proargtypes::oid[]) AS t(oid)
                WHERE t.oid NOT IN ('text'::regtype, 'jsonb'::regtype, 'integer'::regtype,
                                    'boolean'::regtype, 'timestamptz'::regtype, 'text[]'::regtype))
$$, 'public functions take only text, jsonb, integer, boolean and timestamptz arguments');

-- The lifecycle guard (SPEC §4 "Lifecycle": transitions are data, enforced in one place).
SELECT has_trigger('runops', 'runs', 'runs_status_guard', 'runops.runs has the status guard trigger');
SELECT trigger_is('runops', 'runs', 'runs_status_guard', 'runops', 'guard_run_status',
                  'runs_status_guard calls runops.guard_run_status()');
SELECT has_table('runops', 'status_transitions', 'the transition table exists');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.status_transitions AS t
           WHERE t.made_by = 'finalize_run'
             AND t.from_status IN ('DELAYED', 'PENDING', 'PENDING_VERSION', 'WAITING_FOR_DEPLOY', 'DEQUEUED',
                                   'EXECUTING', 'WAITING_TO_RESUME', 'RETRYING_AFTER_FAILURE', 'PAUSED')
             AND t.to_status IN ('CANCELED', 'INTERRUPTED', 'COMPLETED_SUCCESSFULLY', 'COMPLETED_WITH_ERRORS',
                                 'SYSTEM_FAILURE', 'CRASHED', 'EXPIRED', 'TIMED_OUT')),
          9 * 8, 'finalize_run may move any live status to any final status');
SELECT is_empty($$
  SELECT t.from_status, t.to_status, t.made_by FROM runops.status_transitions AS t
  WHERE t.from_status IN ('CANCELED', 'INTERRUPTED', 'COMPLETED_SUCCESSFULLY', 'COMPLETED_WITH_ERRORS',
                          'SYSTEM_FAILURE', 'CRASHED', 'EXPIRED', 'TIMED_OUT')
$$, 'no transition leaves a final status');
SELECT set_has($$ SELECT t.from_status, t.to_status, t.made_by FROM runops.status_transitions AS t $$,
               $$ VALUES ('NEW', 'PENDING', 'trigger_run'), ('NEW', 'DELAYED', 'trigger_run'),
                         ('NEW', 'WAITING_FOR_DEPLOY', 'trigger_run'), ('NEW', 'PENDING_VERSION', 'trigger_run'),
                         ('NEW', 'SYSTEM_FAILURE', 'trigger_failed_task') $$,
               'creation statuses are in the transition table');

-- The run view carries at least the columns SPEC §4 "The run view" names.
SELECT has_view('runops', 'run_view', 'runops.run_view exists');
SELECT is_empty($$
  SELECT c FROM pg_catalog.unnest(ARRAY[
    'run_id', 'environment_id', 'task_identifier', 'status', 'residency', 'created_at', 'updated_at',
    'idempotency_key', 'idempotency_key_scope', 'idempotency_key_expires_at', 'parent_run_id', 'root_run_id',
    'batch_id', 'attempt_number', 'max_attempts', 'payload', 'output', 'error', 'metadata', 'tags', 'queue',
    'concurrency_key', 'delay_until', 'ttl', 'queued_at', 'started_at', 'completed_at', 'expired_at',
    'locked_by']) AS c
  WHERE NOT EXISTS (SELECT FROM information_schema.columns AS ic
                    WHERE ic.table_schema = 'runops' AND ic.table_name = 'run_view' AND ic.column_name = c)
$$, 'run_view has every column SPEC §4 names');
SELECT col_type_is('runops', 'run_view', 'ttl', 'interval', 'run_view.ttl is an interval');

SELECT * FROM finish();
ROLLBACK;
