-- The run-ops store: tenant and split-control functions belong to the control plane (RO002),
-- the tenant mirror is what new work reads, and the split modes as the mirror carries them
-- (SPEC §2 "Split modes", §3 "Where to call", §4 "Control plane"). Tenants are written into the
-- local mirror tables directly (rolled back); see tests/sql/lib/helpers.sql.
BEGIN;
SET LOCAL search_path = tap, public;
\ir ../lib/helpers.sql
SELECT plan(34);

SELECT is(runops.store_role(), 'RUN_OPS', 'this is the run-ops store');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.split_settings), 1, 'the split settings have reached the mirror');

-- Control-plane functions exist here but refuse with RO002 naming the control plane.
SELECT is(pg_temp.error_of($$ SELECT runops.create_organization('pgtap-ro') $$), 'RO002: owning_store=CONTROL_PLANE',
          'create_organization on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.create_project(runops.generate_cuid(), 'p') $$), 'RO002: owning_store=CONTROL_PLANE',
          'create_project on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.create_environment(runops.generate_cuid(), 'e', 'PRODUCTION') $$),
          'RO002: owning_store=CONTROL_PLANE', 'create_environment on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.update_environment(runops.generate_cuid(), '{"paused": true}') $$),
          'RO002: owning_store=CONTROL_PLANE', 'update_environment on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.split_status() $$), 'RO002: owning_store=CONTROL_PLANE', 'split_status on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.enable_split() $$), 'RO002: owning_store=CONTROL_PLANE', 'enable_split on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.disable_split() $$), 'RO002: owning_store=CONTROL_PLANE', 'disable_split on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.set_mint_kind(runops.generate_cuid(), 'ksuid') $$), 'RO002: owning_store=CONTROL_PLANE',
          'set_mint_kind on run-ops is RO002');
SELECT is(pg_temp.error_of($$ SELECT runops.set_default_mint_kind('ksuid') $$), 'RO002: owning_store=CONTROL_PLANE',
          'set_default_mint_kind on run-ops is RO002');
SELECT throws_ok($$ SELECT runops.create_organization('Bad Slug') $$, 'RO006', NULL, 'RO006 before RO002: a bad slug on run-ops');
SELECT throws_ok($$ SELECT runops.set_default_mint_kind('uuid') $$, 'RO006', NULL, 'RO006 before RO002: a bad mint kind on run-ops');

-- Split enabled (as the mirror says).
SELECT pg_temp.set_split(true, true);
SELECT set_config('t.ksuid_env', pg_temp.make_env('ksuid'), true),
       set_config('t.cuid_env', pg_temp.make_env('cuid'), true),
       set_config('t.default_env', pg_temp.make_env(NULL), true),
       set_config('t.ksuid', runops.generate_ksuid(), true),
       set_config('t.cuid', runops.generate_cuid(), true);
SELECT is(runops.trigger_route(current_setting('t.ksuid_env'), '{}'), 'RUN_OPS', 'enabled: a ksuid organization''s roots belong here');
SELECT is(runops.trigger_route(current_setting('t.default_env'), '{}'), 'CONTROL_PLANE', 'enabled: the default mint kind (cuid) routes to the control plane');
SELECT results_eq(
  $$ SELECT t.is_cached, t.status, t.residency FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task') AS t $$,
  $$ VALUES (false, 'PENDING'::text, 'NEW'::text) $$, 'a ksuid organization''s root is a NEW run here');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/task') $$),
          'RO002: owning_store=CONTROL_PLANE', 'a cuid organization''s root is RO002 naming the control plane');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                                pg_catalog.jsonb_build_object('parent_run_id', 'run_' || current_setting('t.cuid'))) $$),
          'RO002: owning_store=CONTROL_PLANE', 'a child of a LEGACY parent is RO002 naming the control plane');
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
       pg_catalog.jsonb_build_object('run_id', current_setting('t.ksuid'))) AS t $$,
  $$ VALUES ('run_' || current_setting('t.ksuid'), false) $$, 'a pre-minted KSUID is used as given here');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', runops.generate_cuid())) $$,
                 'RO006', NULL, 'a pre-minted cuid for a ksuid organization''s root is RO006');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.finalize_run('run_' || current_setting('t.cuid'), 'CANCELED') $$),
          'RO002: owning_store=CONTROL_PLANE', 'finalize_run of a LEGACY id is RO002 naming the control plane');

-- Disabled after being enabled: roots go to the control plane; NEW anchors still decide here.
SELECT set_config('t.parent', 'run_' || current_setting('t.ksuid'), true);
SELECT pg_temp.set_split(false, true);
-- SPEC §2 rule 1: "a pre-minted run_id (a client retrying a trigger) is used as given: if it
-- names an existing run of the same environment and task, that run is returned with is_cached",
-- also when the retry straddles a split flip.
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                                pg_catalog.jsonb_build_object('run_id', current_setting('t.ksuid'))) $$),
          NULL, 'disabled: retrying an existing NEW run''s pre-minted id returns it (no error)');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task') $$),
          'RO002: owning_store=CONTROL_PLANE', 'disabled: a ksuid organization''s new root belongs to the control plane');
SELECT results_eq(
  $$ SELECT t.is_cached, t.residency FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/child', '{}',
       pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.parent'))) AS t $$,
  $$ VALUES (false, 'NEW'::text) $$, 'disabled: a child of a NEW parent is still a NEW run here');
SELECT is((SELECT f.status FROM runops.finalize_run(current_setting('t.parent'), 'COMPLETED_SUCCESSFULLY') AS f),
          'COMPLETED_SUCCESSFULLY', 'disabled: NEW runs stay writable');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.get_run(current_setting('t.parent'))), 1, 'disabled: NEW runs stay readable');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', runops.generate_ksuid())) $$,
                 'RO006', NULL, 'disabled: a pre-minted KSUID for a new root is RO006');

-- Never enabled (the mirror's row says so): NEW writes are RO004 / RO006, every root is LEGACY.
SELECT pg_temp.set_split(false, false);
SELECT is(runops.trigger_route(current_setting('t.ksuid_env'), '{}'), 'CONTROL_PLANE', 'never enabled: every root belongs to the control plane');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', runops.generate_ksuid())) $$,
                 'RO006', NULL, 'never enabled: a pre-minted NEW id is RO006');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('parent_run_id', 'run_' || runops.generate_ksuid())) $$,
                 'RO004', NULL, 'never enabled: a NEW parent is RO004');

-- The mirror gates new work here: a paused mirror row is RO005.
SELECT pg_temp.set_split(true, true);
SELECT pg_temp.update_env(current_setting('t.ksuid_env'), '{"paused": true}');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task') $$,
                 'RO005', NULL, 'a paused environment (mirror) is RO005 here');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(runops.generate_cuid(), 'pgtap/task') $$,
                 'RO004', NULL, 'an environment in neither the mirror nor the control plane is RO004');

-- The run-ops residency CHECK accepts exactly the KSUID range.
SELECT lives_ok($$ INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                            payload, queue, created_at, updated_at)
                   VALUES ('aWgEPTl1tmebfsQzFP4bxwgy80V', 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now()) $$,
                'the largest KSUID fits in runops.runs');

SELECT throws_ok($$ INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                             payload, queue, created_at, updated_at)
                    VALUES ('cjld2cjxh0000qzrmn831i7rn', 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now()) $$,
                 '23514', NULL, 'inserting a cuid into the run-ops store''s runops.runs is a check_violation');

SELECT * FROM finish();
ROLLBACK;
